// A tcp.outbound carries the app's connection only to a server whose certificate carries the
// configured identity as an exact SAN, chains to our CA and matches the pin when one is set.
// Anything else: the app's connection is reset (not closed cleanly, which a client could take
// for an empty answer), nothing is carried, and the refusal is counted and logged under its reason.
import net from "node:net";
import t from "tap";
import { DevCa } from "../certs-dev/store.js";
import { spkiPin } from "../proxy/x509.js";
import { pki, sample, sidecar } from "./lib/mesh.js";
import { countingServer } from "./lib/tcp.js";

/** What an app sees: connect to the tcp.outbound port, send, end, read until the close. */
function appExchange(port: number, data: string): Promise<{ data: string; error: string | null }> {
  return new Promise((resolve) => {
    let received = "";
    let error: string | null = null;
    const s = net.connect({ port, host: "127.0.0.1", allowHalfOpen: true }, () => s.end(data));
    s.on("data", (d: Buffer) => {
      received += d.toString("latin1");
    });
    s.on("error", (err: NodeJS.ErrnoException) => {
      error = err.code ?? err.message;
    });
    s.on("close", () => resolve({ data: received, error }));
  });
}

t.test("a tcp.outbound accepts only the expected server", async (t) => {
  const p = await pki(t);
  const target = await countingServer(t);
  const serverSide = (name: string, extra: Record<string, unknown> = {}) =>
    sidecar(t, p, name, {
      inbound: { enabled: false },
      outbound: { enabled: false },
      tcp: {
        inbound: [{ name: "echo", listen: "127.0.0.1:0", target: target.target, allow: ["boards.ashchan.local"] }],
      },
      ...extra,
    });
  const auth = await serverSide("auth.ashchan.local");
  // A server of another CA that claims auth's name.
  const foreign = await DevCa.init(`${p.dir}/foreign`, { commonName: "foreign-ca" });
  await foreign.issue("auth.ashchan.local");
  const ff = foreign.identityFiles("auth.ashchan.local");
  const impostor = await serverSide("media.ashchan.local", {
    service: { dnsName: "auth.ashchan.local" },
    tls: { cert: ff.cert, key: ff.key, ca: ff.ca, crl: ff.crl },
  });
  const closed = net.createServer();
  await new Promise<void>((resolve) => closed.listen(0, "127.0.0.1", resolve));
  const closedPort = (closed.address() as net.AddressInfo).port;
  await new Promise((resolve) => closed.close(resolve)); // a port nobody listens on

  const { X509Certificate } = await import("node:crypto");
  const authPin = spkiPin(new X509Certificate(p.read(p.files("auth.ashchan.local").cert)).publicKey);
  await p.identity("search.ashchan.local");
  const otherPin = spkiPin(new X509Certificate(p.read(p.files("search.ashchan.local").cert)).publicKey);
  const to = (port: number) => `127.0.0.1:${port}`;
  const authPort = auth.tcpPorts.echo as number;
  const boards = await sidecar(t, p, "boards.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: {
      outbound: [
        { name: "right", listen: "127.0.0.1:0", target: to(authPort), identity: "auth.ashchan.local" },
        { name: "wrong-name", listen: "127.0.0.1:0", target: to(authPort), identity: "moderation.ashchan.local" },
        {
          name: "foreign-ca",
          listen: "127.0.0.1:0",
          target: to(impostor.tcpPorts.echo as number),
          identity: "auth.ashchan.local",
        },
        { name: "pinned", listen: "127.0.0.1:0", target: to(authPort), identity: "auth.ashchan.local", pin: authPin },
        {
          name: "wrong-pin",
          listen: "127.0.0.1:0",
          target: to(authPort),
          identity: "auth.ashchan.local",
          pin: otherPin,
        },
        { name: "nobody-home", listen: "127.0.0.1:0", target: to(closedPort), identity: "auth.ashchan.local" },
      ],
    },
  });
  const port = (name: string) => boards.tcpPorts[name] as number;

  for (const name of ["right", "pinned"]) {
    const r = await appExchange(port(name), `hello via ${name}`);
    t.same(r, { data: `hello via ${name}`, error: null }, `${name}: carried both ways`);
  }

  const refusals = [
    { name: "wrong-name", reason: "bad_san", detail: /presented a certificate for auth\.ashchan\.local/ },
    { name: "foreign-ca", reason: "unknown_ca", detail: /did not verify/ },
    { name: "wrong-pin", reason: "bad_pin", detail: /is not the configured pin/ },
  ];
  for (const c of refusals) {
    const r = await appExchange(port(c.name), "secret");
    t.same(r, { data: "", error: "ECONNRESET" }, `${c.name}: the app's connection is reset, nothing comes back`);
    const line = boards.logs.events("mtls_handshake_failed").find((l) => l.listener === c.name);
    t.match(line, { direction: "outbound", reason: c.reason, detail: c.detail }, `${c.name}: logged as ${c.reason}`);
  }
  const unreachable = await appExchange(port("nobody-home"), "secret");
  t.same(unreachable, { data: "", error: "ECONNRESET" }, "nothing listens at the target: reset");
  t.match(boards.logs.events("tcp_connect_failed"), [{ listener: "nobody-home", reason: "ECONNREFUSED" }]);

  const metrics = await boards.metrics();
  for (const c of refusals) {
    t.equal(sample(metrics, "mtls_handshake_failures", { direction: "outbound", reason: c.reason }), 1, c.reason);
  }
  t.equal(
    sample(metrics, "mtls_handshake_total", { direction: "outbound", result: "failed" }),
    refusals.length,
    "a refused TCP connection is not a failed handshake",
  );
  t.equal(sample(metrics, "mtls_handshake_total", { direction: "outbound", result: "ok" }), 2);
  const tunnels = (code: string, peer: string) =>
    sample(metrics, "mtls_requests_total", { direction: "outbound", peer, code, protocol: "tcp" });
  t.equal(tunnels("200", "auth.ashchan.local"), 2, "two tunnels made (right, pinned)");
  t.equal(
    tunnels("502", "auth.ashchan.local"),
    3,
    "three not made to auth.ashchan.local (foreign CA, wrong pin, nobody home)",
  );
  t.equal(tunnels("502", "moderation.ashchan.local"), 1, "and one to moderation.ashchan.local (wrong name)");
  // The impostor's target saw nothing: boards refused it and sent no byte of the app's.
  t.notOk(
    impostor.logs.events("tcp_tunnel_closed").some((l) => Number(l.bytes_in) > 0),
    "no byte to the impostor",
  );
});
