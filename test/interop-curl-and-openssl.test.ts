// The sidecar driven by the tools operators use: curl with --cert, curl through HTTP_PROXY,
// and openssl s_client (the seed's health check).
import { spawnSync } from "node:child_process";
import t from "tap";
import { hasOpenssl, openssl } from "./lib/certs.js";
import { app, pki, sidecar } from "./lib/mesh.js";
import { run } from "./lib/run.js";

const hasCurl = spawnSync("curl", ["--version"]).status === 0;

t.test(
  "curl and openssl s_client against a sidecar pair",
  { skip: !hasCurl || !hasOpenssl ? "curl or openssl is not installed" : false },
  async (t) => {
    const p = await pki(t);
    const backend = await app(t);
    const auth = await sidecar(t, p, "auth.ashchan.local", {
      inbound: { app: backend.url, allow: ["gateway.ashchan.local"] },
      outbound: { enabled: false },
    });
    const gw = await sidecar(t, p, "gateway.ashchan.local", {
      inbound: { enabled: false },
      outbound: { resolve: { "auth.ashchan.local": `127.0.0.1:${auth.inboundPort}` } },
    });
    const client = p.files("gateway.ashchan.local");
    const resolve = `auth.ashchan.local:${auth.inboundPort}:127.0.0.1`;
    const url = `https://auth.ashchan.local:${auth.inboundPort}/health`;

    const ok = await run("curl", [
      "-sS",
      "--cacert",
      p.trust.ca,
      "--cert",
      client.cert,
      "--key",
      client.key,
      "--resolve",
      resolve,
      url,
    ]);
    t.equal(ok.code, 0, `curl --cert: ${ok.err}`);
    t.match(JSON.parse(ok.out), { url: "/health", xfcc: /DNS=gateway\.ashchan\.local/ });

    const noCert = await run("curl", ["-sS", "--cacert", p.trust.ca, "--resolve", resolve, url]);
    t.not(noCert.code, 0, "curl without a client certificate fails");
    t.equal(backend.seen.length, 1, "and reaches nothing");

    const viaProxy = await run("curl", [
      "-sS",
      "-x",
      `http://127.0.0.1:${gw.outboundPort}`,
      "-X",
      "POST",
      "-d",
      "{}",
      "http://auth.ashchan.local/api/v1/verify",
    ]);
    t.equal(viaProxy.code, 0, `curl through HTTP_PROXY: ${viaProxy.err}`);
    t.match(JSON.parse(viaProxy.out), { method: "POST", url: "/api/v1/verify", xfcc: /DNS=gateway\.ashchan\.local/ });

    const connect = [
      "s_client",
      "-connect",
      `127.0.0.1:${auth.inboundPort}`,
      "-servername",
      "auth.ashchan.local",
      "-CAfile",
      p.trust.ca,
    ];
    const request = "GET /s_client HTTP/1.1\r\nHost: auth.ashchan.local\r\nConnection: close\r\n\r\n";
    const brief = await openssl([...connect, "-cert", client.cert, "-key", client.key, "-brief", "-ign_eof"], request);
    t.match(brief.err, /Protocol version: TLSv1\.3/);
    t.match(brief.err, /Ciphersuite: TLS_AES_256_GCM_SHA384/);
    t.match(brief.err, /Verification: OK/);
    t.match(brief.err, /Peer certificate: CN ?= ?auth\.ashchan\.local/);
    t.match(brief.out, /^HTTP\/1\.1 200 OK/, "s_client with a certificate gets an answer");

    const anonymous = await openssl([...connect, "-quiet", "-ign_eof"], request);
    t.notMatch(anonymous.out, /HTTP\/1\.1/, "s_client without a certificate gets no answer");

    const tls12 = await openssl([...connect, "-cert", client.cert, "-key", client.key, "-tls1_2", "-quiet"], request);
    t.not(tls12.code, 0);
    t.match(tls12.err, /alert protocol version|unsupported protocol|wrong version/i);
    t.same(
      backend.seen.map((r) => r.url),
      ["/health", "/api/v1/verify", "/s_client"],
      "only the three authenticated requests reached the app",
    );
  },
);
