// `ashmesh check --config` with a `tcp` section: a line per TCP listener (where it listens,
// where it goes, who may use it), a tcp.inbound target that accepts connections and one that
// does not, an allow-list of "*", and tcp.outbound targets checked with the sidecar's own
// connector: one proves the identity, one presents another, one is down.
import net from "node:net";
import { join } from "node:path";
import t from "tap";
import { pki, sidecar } from "./lib/mesh.js";
import { ashmeshCli } from "./lib/run.js";
import { writeYaml } from "./lib/spawn.js";
import { countingServer } from "./lib/tcp.js";

async function closedPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, "127.0.0.1", resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((resolve) => s.close(resolve));
  return port;
}

t.test("check --config: one line per TCP listener, targets checked", async (t) => {
  const p = await pki(t);
  const target = await countingServer(t);
  const down = await closedPort();
  const media = await sidecar(t, p, "media.ashchan.local", {
    inbound: { enabled: false },
    outbound: { enabled: false },
    tcp: { inbound: [{ name: "echo", listen: "127.0.0.1:0", target: target.target, allow: ["boards.ashchan.local"] }] },
  });
  const files = await p.identity("boards.ashchan.local");
  const mediaAt = `127.0.0.1:${media.tcpPorts.echo}`;
  const config = writeYaml(join(p.dir, "boards.yaml"), {
    service: { name: "boards", dnsName: "boards.ashchan.local" },
    tls: { cert: files.cert, key: files.key, ca: files.ca, crl: files.crl },
    inbound: { allow: ["gateway.ashchan.local"] },
    tcp: {
      inbound: [
        { name: "cache", listen: "0.0.0.0:6380", target: target.target, allow: ["gateway.ashchan.local"] },
        { name: "db", listen: "0.0.0.0:5433", target: `127.0.0.1:${down}`, allow: [] },
        { name: "open", listen: "0.0.0.0:6381", target: target.target, allow: ["*"] },
      ],
      outbound: [
        { name: "media", listen: "127.0.0.1:16379", target: mediaAt, identity: "media.ashchan.local" },
        { name: "impostor", listen: "127.0.0.1:16380", target: mediaAt, identity: "search.ashchan.local" },
        { name: "gone", listen: "127.0.0.1:16381", target: `127.0.0.1:${down}`, identity: "media.ashchan.local" },
      ],
    },
  });
  const r = await ashmeshCli(["check", "--config", config, "--timeout", "3000"], { timeoutMs: 60_000 });
  t.equal(r.code, 1, "exit 1: some checks fail");
  const lines = [
    new RegExp(`√ tcp\\.inbound cache: mTLS on 0\\.0\\.0\\.0:6380 → ${target.target} \\(loopback\\)`),
    /√ tcp\.inbound cache: allow-list: gateway\.ashchan\.local/,
    /√ tcp\.inbound db: allow-list: nobody/,
    /× tcp\.inbound open: allow has "\*": any identity the mesh CA signed reaches/,
    /√ tcp\.outbound media: 127\.0\.0\.1:16379 → mTLS to 127\.0\.0\.1:\d+, which must prove media\.ashchan\.local/,
    new RegExp(`√ tcp\\.inbound cache: ${target.target} accepts connections`),
    new RegExp(`× tcp\\.inbound db: nothing accepts connections at 127\\.0\\.0\\.1:${down} \\(ECONNREFUSED\\)`),
    /√ tcp\.outbound media: 127\.0\.0\.1:\d+ proved media\.ashchan\.local \(TLSv1\.3\)/,
    /× tcp\.outbound impostor: .*presented a certificate for media\.ashchan\.local, not for search\.ashchan\.local/,
    /× tcp\.outbound gone: .*ECONNREFUSED/,
  ];
  for (const line of lines) t.match(r.out, line);
  t.match(r.out, /Status check results are × \(4 of \d+ failed\)/, "exactly the four expected failures");
});
