// Invariant 9: a private key readable by group or others is warned about (naming the file and
// the fix); no key or certificate body ever appears in a log line.
import { chmodSync, readFileSync, statSync, writeFileSync } from "node:fs";
import t from "tap";
import { request } from "undici";
import { app, eventually, mtlsAgent, pki, sidecar, viaProxy } from "./lib/mesh.js";

t.test("a 0644 key is warned about; a 0600 key is not", async (t) => {
  const p = await pki(t);
  const loose = await p.identity("auth.ashchan.local");
  chmodSync(loose.key, 0o644);
  const auth = await sidecar(t, p, "auth.ashchan.local", { outbound: { enabled: false } });
  const warning = auth.logs.events("identity_warning").find((l) => String(l.message).includes(loose.key));
  t.ok(warning, "warned");
  t.match(String(warning?.message), /readable by group or others \(mode 0644\); run chmod 600/);

  const tight = await p.identity("boards.ashchan.local");
  t.equal(statSync(tight.key).mode & 0o777, 0o600, "the dev CA writes keys 0600");
  const boards = await sidecar(t, p, "boards.ashchan.local", { outbound: { enabled: false } });
  t.same(boards.logs.events("identity_warning"), []);
});

t.test("no key or certificate material in any log line, whatever happens", async (t) => {
  const p = await pki(t);
  const backend = await app(t);
  const auth = await sidecar(t, p, "auth.ashchan.local", {
    inbound: { app: backend.url },
    outbound: { enabled: false },
  });
  const gw = await sidecar(t, p, "gateway.ashchan.local", {
    inbound: { enabled: false },
    outbound: { resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
  });
  await viaProxy(gw.outboundPort, "http://auth.ashchan.local/");
  await request(`https://127.0.0.1:${auth.inboundPort}/`, {
    dispatcher: mtlsAgent(p, null, { servername: "auth.ashchan.local" }),
  }).catch(() => undefined);
  await p.ca.issue("auth.ashchan.local", { replace: true });
  await auth.sidecar.reload("test");
  // A broken key file: the reload fails, and the failure is logged without the file's content.
  writeFileSync(
    p.files("auth.ashchan.local").key,
    "-----BEGIN PRIVATE KEY-----\nMIIBroken\n-----END PRIVATE KEY-----\n",
  );
  await auth.sidecar.reload("test");
  // A reload the file watcher started may be the one in flight, and report the failure only
  // after its retry: wait for the line rather than assume it is there.
  t.ok(await eventually(() => auth.logs.events("cert_reload_failed").length >= 1, 10_000));

  const secrets = [p.files("gateway.ashchan.local").key, p.files("auth.ashchan.local").cert, p.trust.ca].map((f) =>
    readFileSync(f, "utf8").split("\n")[1]?.slice(0, 40),
  );
  for (const line of [...auth.logs.lines, ...gw.logs.lines]) {
    const text = JSON.stringify(line);
    t.notMatch(text, /-----BEGIN/, "no PEM block");
    t.notMatch(text, /MIIBroken/, "not even a broken key's body");
    for (const s of secrets) if (s) t.notOk(text.includes(s), "no base64 of a key or certificate");
  }
});
