// The `tcp` section: a tcp.inbound target off loopback (the bytes would cross a network in plain
// text after the sidecar verified them), a tcp.outbound listening off loopback (an open relay
// into the mesh), a missing allow-list or identity, and names that clash are refused with a
// message naming the field and the value. TCP_INBOUND / TCP_OUTBOUND set the lists from the
// environment, in the file's own syntax.
import t from "tap";
import { ConfigError, parseConfig } from "../config/load.js";

const base = { service: { name: "redis-cache", dnsName: "redis.ashchan.local" } };
const inbound = { name: "redis", listen: "0.0.0.0:6380", target: "127.0.0.1:6379", allow: ["boards.ashchan.local"] };
const outbound = {
  name: "redis",
  listen: "127.0.0.1:6379",
  target: "redis.ashchan.local:6380",
  identity: "redis.ashchan.local",
};

function message(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof ConfigError) return err.message;
    throw err;
  }
  throw new Error("expected a ConfigError");
}

t.test("defaults: no TCP listener; pin null", async (t) => {
  t.same(parseConfig(base).tcp, { inbound: [], outbound: [] });
  const c = parseConfig({ ...base, tcp: { inbound: [inbound], outbound: [{ ...outbound, name: "out" }] } });
  t.same(c.tcp.inbound[0]?.listen, { host: "0.0.0.0", port: 6380 });
  t.equal(c.tcp.outbound[0]?.pin, null);
});

t.test("each refusal names the field and the value", async (t) => {
  const cases: Array<[string, unknown, RegExp]> = [
    [
      "a tcp.inbound target off loopback",
      { inbound: [{ ...inbound, target: "10.0.0.5:6379" }] },
      /tcp\.inbound\.0\.target="10\.0\.0\.5:6379" is not valid: expected "host:port" on loopback/,
    ],
    [
      "a tcp.inbound target on all interfaces",
      { inbound: [{ ...inbound, target: ":6379" }] },
      /tcp\.inbound\.0\.target=":6379" is not valid/,
    ],
    [
      "a tcp.inbound without allow",
      { inbound: [{ ...inbound, allow: undefined }] },
      /tcp\.inbound\.0\.allow is required: expected a list of the identities that may connect \(\[\] for nobody/,
    ],
    [
      "a tcp.outbound listening off loopback",
      { outbound: [{ ...outbound, listen: "0.0.0.0:6379" }] },
      /tcp\.outbound\.0\.listen="0\.0\.0\.0:6379" is not valid: the outbound listener must bind to a loopback address/,
    ],
    [
      "a tcp.outbound without identity",
      { outbound: [{ ...outbound, identity: undefined }] },
      /tcp\.outbound\.0\.identity is required: expected the DNS name the peer's certificate must carry/,
    ],
    [
      "a tcp.outbound target without a port",
      { outbound: [{ ...outbound, target: "redis.ashchan.local" }] },
      /tcp\.outbound\.0\.target="redis\.ashchan\.local" is not valid: expected "host:port" of a peer's tcp\.inbound/,
    ],
    [
      "a bad pin",
      { outbound: [{ ...outbound, pin: "sha1//abc" }] },
      /tcp\.outbound\.0\.pin="sha1\/\/abc" is not valid/,
    ],
    [
      "two listeners with one name",
      { inbound: [inbound], outbound: [outbound] },
      /tcp\.outbound\.0\.name="redis" is not valid: expected a name no other tcp listener has/,
    ],
    [
      "a name of the HTTP listeners",
      { inbound: [{ ...inbound, name: "inbound" }] },
      /tcp\.inbound\.0\.name="inbound" is not valid: inbound and outbound name the HTTP listeners/,
    ],
    ["an unknown key", { inbound: [{ ...inbound, alow: [] }] }, /unknown key "tcp\.inbound\.0\.alow"/],
  ];
  for (const [name, tcp, expected] of cases) {
    t.match(
      message(() => parseConfig({ ...base, tcp })),
      expected,
      name,
    );
  }
});

t.test("TCP_INBOUND and TCP_OUTBOUND take the lists in YAML or JSON", async (t) => {
  const c = parseConfig(base, {
    env: {
      TCP_INBOUND: '[{name: redis, listen: "0.0.0.0:6380", target: "127.0.0.1:6379", allow: [boards.ashchan.local]}]',
      TCP_OUTBOUND: JSON.stringify([{ ...outbound, name: "out", listen: "127.0.0.1:16379" }]),
    },
  });
  t.same(c.tcp.inbound[0]?.allow, ["boards.ashchan.local"]);
  t.equal(c.tcp.outbound[0]?.identity, "redis.ashchan.local");
  t.match(
    message(() => parseConfig(base, { env: { TCP_INBOUND: '[{name: redis, target: "10.0.0.1:1"' } })),
    /TCP_INBOUND \(tcp\.inbound\)=.* is not valid: expected a list of listeners \{name, listen, target, allow\}/,
  );
  t.match(
    message(() =>
      parseConfig(base, {
        env: { TCP_INBOUND: '[{name: r, listen: ":6380", target: "10.0.0.1:6379", allow: []}]' },
      }),
    ),
    /TCP_INBOUND \(tcp\.inbound\.0\.target\)=.* is not valid: expected "host:port" on loopback/,
    "a bad value inside the variable is named by the variable and the field",
  );
});
