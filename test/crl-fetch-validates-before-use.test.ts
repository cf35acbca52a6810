// CRLs fetched from the CA over HTTPS (tls.crlUrl, and the CRL distribution point a certificate
// names) reach the sidecar through tls.crl: a revocation published by the CA cuts the revoked
// peer off within the refresh interval (new handshakes and open connections). A CRL that is not
// signed by a CA of tls.ca, is past its nextUpdate, is older than the one in use, or does not
// parse, and a server that fails, never replace the CRL in use: the failure is counted per URL.
import { mkdtempSync, readFileSync, rmSync, statSync } from "node:fs";
import https from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { Agent, request } from "undici";
import { createCa, createCrl, type KeyPairPem } from "../certs-dev/pki.js";
import { DevCa } from "../certs-dev/store.js";
import { parseConfig } from "../config/load.js";
import { Sidecar } from "../proxy/sidecar.js";
import { app, eventually, LogLines, pki, sample } from "./lib/mesh.js";

type Mode = "current" | "foreign" | "expired" | "older" | "garbage" | "error" | "pem";

t.test("CRLs from the CA's distribution point: revocation within the interval, bad lists refused", async (t) => {
  const p = await pki(t);
  const caFiles = DevCa.paths(p.dir);
  const ca: KeyPairPem = { certPem: readFileSync(caFiles.caCert, "utf8"), keyPem: readFileSync(caFiles.caKey, "utf8") };
  const foreign = await createCa({ commonName: "ashchan-ca" }); // same name, another key
  const started = Date.now();

  // The CA's CRL distribution point: serves what the dev CA last published, or a bad list.
  const state: { mode: Mode; hits: Record<string, number> } = { mode: "current", hits: {} };
  const der = (pem: string) => Buffer.from(pem.replace(/-----[^-]+-----|\s/g, ""), "base64");
  const body = async (): Promise<Buffer | null> => {
    switch (state.mode) {
      case "current":
        return der(readFileSync(p.trust.crl, "utf8"));
      case "pem":
        return readFileSync(p.trust.crl);
      case "foreign":
        return der(await createCrl(foreign, { revoked: [], number: 99 }));
      case "expired":
        return der(
          await createCrl(ca, {
            revoked: [],
            number: 99,
            thisUpdate: new Date(started - 3 * 86_400_000),
            nextUpdateDays: 1,
          }),
        );
      case "older":
        return der(await createCrl(ca, { revoked: [], number: 1, thisUpdate: new Date(started - 3_600_000) }));
      case "garbage":
        return Buffer.from("this is not a CRL");
      case "error":
        return null;
    }
  };
  // Served with a certificate of the CA itself, as step-ca serves its /crl: tls.ca trusts it.
  const serverId = await p.identity("localhost", { ip: ["127.0.0.1"] });
  const server = https.createServer({ cert: p.read(serverId.cert), key: p.read(serverId.key) }, (req, res) => {
    state.hits[req.url ?? ""] = (state.hits[req.url ?? ""] ?? 0) + 1;
    void body().then((b) => {
      if (!b) res.writeHead(500).end("CA is having a bad day");
      else res.writeHead(200, { "content-type": "application/pkix-crl" }).end(b);
    });
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.teardown(() => {
    server.closeAllConnections();
    server.close();
  });
  const base = `https://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const url = `${base}/ca.crl`;

  // auth's certificate names a second distribution point, fetched as well as tls.crlUrl.
  const auth = await p.identity("auth.ashchan.local", { crlUrls: [`${base}/cdp.crl`] });
  const gateway = await p.identity("gateway.ashchan.local");
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-crlfetch-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const crlFile = join(dir, "fetched.crl"); // not there yet: the first fetch, before start, writes it
  const backend = await app(t);
  const logs = new LogLines();
  const sidecar = await Sidecar.create(
    parseConfig({
      service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
      tls: { cert: auth.cert, key: auth.key, ca: auth.ca, crl: crlFile, crlUrl: url, crlRefreshMs: 250 },
      inbound: { listen: "127.0.0.1:0", app: backend.url, allow: ["gateway.ashchan.local"] },
      outbound: { enabled: false },
      admin: { listen: "127.0.0.1:0" },
    }),
    { logDestination: logs, processMetrics: false },
  );
  t.teardown(() => sidecar.stop());
  const listening = await sidecar.start();
  const port = listening.inbound?.port ?? 0;
  const admin = `http://127.0.0.1:${listening.admin?.port}`;
  const metrics = async () => (await request(`${admin}/metrics`)).body.text();

  t.equal(
    readFileSync(crlFile, "utf8"),
    readFileSync(p.trust.crl, "utf8"),
    "the CA's CRL was fetched before start and written to tls.crl",
  );
  t.equal(statSync(crlFile).mode & 0o777, 0o644, "0644, like the CRLs of `ashmesh certs`");
  t.ok(
    await eventually(() => (state.hits["/cdp.crl"] ?? 0) > 0),
    "the distribution point named in the certificate is fetched too",
  );
  let text = await metrics();
  for (const u of [url, `${base}/cdp.crl`]) {
    t.ok(
      sample(text, "mtls_crl_fetch_total", { url: u, result: "ok" }) >= 1,
      `mtls_crl_fetch_total{url=${u},result=ok}`,
    );
    const last = sample(text, "mtls_crl_last_fetch_timestamp_seconds", { url: u });
    t.ok(
      last >= started / 1000 - 1 && last <= Date.now() / 1000 + 1,
      "mtls_crl_last_fetch_timestamp_seconds is recent",
    );
  }

  // A peer with an open connection, then the CA revokes it.
  const dispatcher = new Agent({
    connect: {
      ca: p.read(auth.ca),
      cert: p.read(gateway.cert),
      key: p.read(gateway.key),
      servername: "auth.ashchan.local",
    },
    keepAliveTimeout: 60_000,
  });
  t.teardown(() => dispatcher.destroy());
  const get = async () => {
    try {
      const r = await request(`https://127.0.0.1:${port}/x`, { dispatcher });
      await r.body.dump();
      return r.statusCode;
    } catch (err) {
      return (err as NodeJS.ErrnoException).code ?? "error";
    }
  };
  t.equal(await get(), 200, "gateway is served");
  await p.ca.revoke("gateway.ashchan.local");
  t.ok(
    await eventually(
      () => logs.events("mtls_connection_revoked").some((l) => l.identity === "gateway.ashchan.local"),
      5_000,
    ),
    "within the refresh interval the open connection of the revoked peer is closed",
  );
  t.not(await get(), 200, "and a new one is refused");
  t.ok(
    logs.events("crl_fetched").some((l) => (l.crls as Array<{ revoked: number }>).some((c) => c.revoked === 1)),
    "crl_fetched names the new list",
  );
  const revokedPem = readFileSync(crlFile, "utf8");
  t.equal(revokedPem, readFileSync(p.trust.crl, "utf8"), "tls.crl holds the CA's new CRL");

  // Bad answers, one after the other: none replaces the CRL in use, each is counted and logged.
  const bad: Array<[Mode, RegExp]> = [
    ["foreign", /not signed by any CA in tls\.ca/],
    ["expired", /past its nextUpdate/],
    ["older", /older than the one in use/],
    ["garbage", /the answer is not a CRL/],
    ["error", /HTTP 500/],
  ];
  for (const [mode, reason] of bad) {
    const failedBefore = sample(await metrics(), "mtls_crl_fetch_total", { url, result: "failed" });
    const logged = logs.events("crl_fetch_failed").length;
    state.mode = mode;
    const line = () =>
      logs
        .events("crl_fetch_failed")
        .slice(logged)
        .find((l) => l.url === url && reason.test(String(l.reason)));
    t.ok(await eventually(() => line() !== undefined, 5_000), `${mode}: crl_fetch_failed says why (${line()?.reason})`);
    t.ok(
      sample(await metrics(), "mtls_crl_fetch_total", { url, result: "failed" }) > failedBefore,
      `${mode}: counted as failed`,
    );
    t.equal(readFileSync(crlFile, "utf8"), revokedPem, `${mode}: tls.crl is untouched`);
    t.not(await get(), 200, `${mode}: gateway stays refused`);
  }
  state.mode = "pem";
  const okBefore = sample(await metrics(), "mtls_crl_fetch_total", { url, result: "ok" });
  t.ok(
    await eventually(
      async () => sample(await metrics(), "mtls_crl_fetch_total", { url, result: "ok" }) > okBefore,
      5_000,
    ),
    "a PEM answer is read too",
  );
  text = await metrics();
  t.ok(
    sample(text, "mtls_handshake_failures", { direction: "inbound", reason: "revoked" }) >= 1,
    "the refusals were for revocation",
  );
  const status = (await (await request(`${admin}/status`)).body.json()) as {
    crl_fetch: { urls: string[]; last_success: string };
  };
  t.same(status.crl_fetch.urls, [url, `${base}/cdp.crl`], "/status lists the URLs fetched");
  t.ok(status.crl_fetch.last_success, "and the last success");
  t.equal(backend.seen.length, 1, "only the one request before the revocation reached the app");
});
