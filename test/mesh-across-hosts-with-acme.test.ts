// The six-service mesh across three "hosts" (network namespaces on one LAN, names from a hosts
// file per namespace), every sidecar a real `ashmesh proxy` that gets its certificate from a real
// ACME CA (Pebble, validating tls-alpn-01 on each sidecar's :8443) and its CRLs from the CA's
// distribution point (played by this test: Pebble 2.4 publishes none). The seed's post crosses
// hosts; a renewal under steady traffic loses no request; a revocation published in the CA's CRL
// cuts the revoked service off on every host.
//
//   host 1: gateway, auth      host 2: boards, search      host 3: media, moderation
//   LAN:    Pebble (acme.ashchan.test)      this test: the client, and crl.ashchan.test
import { X509Certificate } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import t from "tap";
import { request } from "undici";
import type { HopReport } from "../compose/standin.js";
import { grpcUpstreams, loadMesh, service } from "../config/mesh.js";
import { eventually, sample, sleep } from "./lib/mesh.js";
import { lan, namespacesUnavailable } from "./lib/netns.js";
import { challtestsrvTool, crlServer, crlSigners, infraCa, pebbleTool, startPebble } from "./lib/pebble.js";
import { run } from "./lib/run.js";
import { ashmesh, type Running } from "./lib/spawn.js";

t.setTimeout(300_000);

const mesh = loadMesh("compose/mesh.yaml");
const PLACEMENT: string[][] = [
  ["gateway", "auth"],
  ["boards", "search"],
  ["media", "moderation"],
];
/** Each service's own address on its host: 10.x.y.<octet>. */
const OCTET: Record<string, number> = { gateway: 11, auth: 12, boards: 13, search: 14, media: 15, moderation: 16 };
/** media renews 18 s after each issuance (0.5 % of Pebble's 1-hour certificates); the others at 70 %. */
const RENEW_AT: Record<string, number> = { media: 0.005 };
const CRL_REFRESH_MS = 1_000;

const tools = [pebbleTool, challtestsrvTool].find((tool) => tool.skip);
const unavailable = tools ? tools.skip : await namespacesUnavailable();

t.test(
  "six sidecars on three hosts, certificates from ACME, CRLs from the CA",
  { skip: unavailable ?? false },
  async (t) => {
    const net = await lan(t, {
      addresses: PLACEMENT.map((keys) => keys.map((k) => OCTET[k] as number)),
      names: {
        ...Object.fromEntries(mesh.services.map((s) => [s.dnsName, OCTET[s.key] as number])),
        "acme.ashchan.test": 1,
        "crl.ashchan.test": 254,
      },
    });
    t.comment(
      `LAN ${net.prefix}.0/24; link between hosts: ${net.wireguard ? "WireGuard available (veth used)" : "veth (no WireGuard in this kernel)"}`,
    );
    const hostOf = (key: string) => PLACEMENT.findIndex((keys) => keys.includes(key));
    const address = (key: string) => `${net.prefix}.${OCTET[key]}`;

    // The CA on the LAN: Pebble validates tls-alpn-01 on port 8443 of each name, resolved through
    // the LAN namespace's hosts file.
    const infra = await infraCa(t);
    const pebble = await startPebble(t, infra, {
      tlsPort: 8443,
      validitySeconds: 3_600,
      host: net.lanAddress,
      port: 14_000,
      managementPort: 15_000,
      dns: ["acme.ashchan.test"],
      resolveTo: null,
      prefix: net.exec(net.lan),
    });
    // Pebble 2.4 publishes no CRL, and its CA certificates lack cRLSign: the test certifies its
    // keys again with cRLSign (same names and keys), trusts those and plays the distribution point.
    const signers = await crlSigners(pebble);
    const crl = await crlServer(t, pebble, signers, {
      host: net.rootAddress,
      name: "crl.ashchan.test",
      nextUpdateDays: 1,
    });

    const dir = mkdtempSync(join(tmpdir(), "ashmesh-hosts-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    // tls.ca: Pebble's root and its issuing intermediate, so that a CRL of each can be checked
    // (OpenSSL checks revocation at every level of the chain once CRLs are on).
    const trust = join(dir, "ca.crt");
    writeFileSync(trust, signers.root.certPem + signers.intermediate.certPem);

    const sidecars = new Map<string, Running>();
    const apps: Running[] = [];
    t.teardown(async () => {
      for (const p of [...sidecars.values(), ...apps]) p.child.kill("SIGTERM");
      // Up to 20 s for the drains, then SIGKILL: the timer is cleared so it holds nothing up.
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 20_000);
        void Promise.all([...sidecars.values(), ...apps].map((p) => p.exited)).then(() => {
          clearTimeout(timer);
          resolve();
        });
      });
      for (const p of [...sidecars.values(), ...apps]) p.child.kill("SIGKILL");
    });
    for (const s of mesh.services) {
      const ns = net.hosts[hostOf(s.key)] as string;
      const config = join(dir, `${s.key}.yaml`);
      writeFileSync(
        config,
        JSON.stringify({
          service: { name: s.serviceName, dnsName: s.dnsName },
          tls: {
            cert: join(dir, s.key, "server.crt"),
            key: join(dir, s.key, "server.key"),
            ca: trust,
            crl: join(dir, s.key, "ca.crl"),
            crlUrl: crl.urls,
            crlRefreshMs: CRL_REFRESH_MS,
          },
          inbound: {
            listen: `${address(s.key)}:${mesh.ports.mtls}`,
            app: `http://${s.local}:${s.appPort}`,
            appProtocol: s.appProtocol,
            allow: s.callers.map((c) => service(mesh, c).dnsName),
          },
          outbound: {
            listen: `${s.local}:${mesh.ports.outbound}`,
            destinations: [...new Set(s.calls.map((c) => service(mesh, c.to).dnsName))],
            // boards reaches search's gRPC service on a mapped port, as in the mesh file.
            upstreams: grpcUpstreams(mesh, s.key, s.local),
          },
          admin: { listen: `${address(s.key)}:${mesh.ports.admin}` },
          acme: {
            directory: "https://acme.ashchan.test:14000/dir",
            caBundle: infra.bundle,
            renewAt: RENEW_AT[s.key] ?? 0.7,
            retryMinMs: 500,
          },
        }),
      );
      sidecars.set(s.key, ashmesh(["proxy", "--config", config], { prefix: net.exec(ns) }));
      apps.push(
        ashmesh([], {
          prefix: net.exec(ns),
          script: "compose/standin.ts",
          env: {
            STANDIN_SERVICE: s.key,
            MESH_FILE: "compose/mesh.yaml",
            HTTP_PROXY: `http://${s.local}:${mesh.ports.outbound}`,
            // The gateway's app is the entry from outside (the seed's public :9501); the others
            // listen on loopback only, reachable through their sidecar alone.
            STANDIN_HOST: s.key === mesh.entry.service ? address(s.key) : s.local,
          },
        }),
      );
    }
    const admin = (key: string) => `http://${address(key)}:${mesh.ports.admin}`;
    await Promise.all(
      [...sidecars].map(([key, p]) =>
        p
          .waitFor((l) => l.event === "listening" && l.listener === "admin", 60_000)
          .catch(() => {
            const lines = p.lines.filter((l) => l.event !== "acme_challenge_answered").slice(0, 12);
            throw new Error(`${key} did not start:\n${lines.map((l) => JSON.stringify(l)).join("\n")}`);
          }),
      ),
    );
    await Promise.all(apps.map((p) => p.waitFor((l) => l.event === "standin_listening", 60_000)));

    await t.test("every sidecar ordered its certificate from the CA over tls-alpn-01", async (t) => {
      for (const [key, p] of sidecars) {
        const issued = p.lines.find((l) => l.event === "acme_certificate_issued");
        t.match(issued?.issuer, /Pebble Intermediate CA/, `${key}: issued by Pebble`);
        t.ok(
          p.lines.some((l) => l.event === "acme_challenge_answered" && l.type === "tls-alpn-01"),
          `${key}: answered tls-alpn-01 itself`,
        );
        t.ok(
          p.lines.some((l) => l.event === "crl_fetched"),
          `${key}: fetched the CA's CRLs`,
        );
      }
    });

    const entry = `http://${address(mesh.entry.service)}:${service(mesh, mesh.entry.service).appPort}${mesh.entry.path}`;
    const post = async (): Promise<{ status: number; report: HopReport | null; error?: string }> => {
      try {
        const r = await request(entry, { method: "POST", body: "{}", headersTimeout: 20_000, bodyTimeout: 20_000 });
        const text = await r.body.text();
        let report: HopReport | null = null;
        try {
          report = JSON.parse(text) as HopReport;
        } catch {
          report = null;
        }
        return { status: r.statusCode, report };
      } catch (err) {
        return { status: 0, report: null, error: (err as Error).message };
      }
    };

    await t.test("the post crosses hosts, every hop verified", async (t) => {
      const { status, report } = await post();
      t.equal(status, 200, "the post succeeds", { report });
      const hops: Array<[string, string]> = [];
      const walk = (r: HopReport) => {
        for (const c of r.calls) {
          hops.push([r.served_by, c.to]);
          t.equal(c.status, 200, `${r.served_by} → ${c.to}`);
          t.equal(c.answer?.caller, r.served_by, `${c.to} saw ${r.served_by}'s certificate`);
          if (c.answer) walk(c.answer);
        }
      };
      if (report) walk(report);
      t.equal(hops.length, 5, "five hops");
      // Who connected from where: the callee's handshake log names the caller's host address.
      for (const [from, to] of hops) {
        const fromKey = from.split(".")[0] as string;
        const toKey = to.split(".")[0] as string;
        const callerHost = PLACEMENT[hostOf(fromKey)]?.map(address) ?? [];
        const seen = sidecars
          .get(toKey)
          ?.lines.find((l) => l.event === "mtls_handshake_complete" && l.client_cn === from);
        t.ok(
          seen && callerHost.includes(String(seen.remote_addr)),
          `${to} saw ${from} from ${seen?.remote_addr} (host ${hostOf(fromKey) + 1})`,
        );
        if (hostOf(fromKey) !== hostOf(toKey))
          t.comment(`${from} (host ${hostOf(fromKey) + 1}) → ${to} (host ${hostOf(toKey) + 1}) crossed hosts`);
      }
      t.ok(
        hops.filter(([f, to]) => hostOf(f.split(".")[0] as string) !== hostOf(to.split(".")[0] as string)).length >= 3,
        "at least three hops cross hosts",
      );
    });

    /** The serial of the certificate a sidecar presents on its inbound port right now. */
    const presented = (key: string) =>
      new Promise<string>((resolve, reject) => {
        const socket = tls.connect(
          {
            host: address(key),
            port: mesh.ports.mtls,
            servername: service(mesh, key).dnsName,
            rejectUnauthorized: false,
          },
          () => {
            const cert = socket.getPeerX509Certificate();
            socket.destroy();
            resolve(cert ? new X509Certificate(cert.raw).serialNumber.toLowerCase().replace(/^0+/, "") : "");
          },
        );
        socket.on("error", reject);
      });

    await t.test("media renews under steady traffic: no post fails", async (t) => {
      const media = sidecars.get("media") as Running;
      const before = await presented("media");
      const issued = () => media.lines.filter((l) => l.event === "acme_certificate_issued");
      const count = issued().length;
      const results: Array<{ status: number; error?: string }> = [];
      let running = true;
      const worker = async () => {
        const end = Date.now() + 120_000;
        while (running && Date.now() < end) {
          const r = await post();
          results.push({ status: r.status, ...(r.error ? { error: r.error } : {}) });
          await sleep(20);
        }
      };
      const workers = [worker(), worker()];
      const renewed = await eventually(() => issued().length > count, 60_000);
      t.ok(renewed, "media's certificate was renewed (18 s after the last issuance)");
      const serial = String(issued().at(-1)?.serial);
      t.ok(
        await eventually(() => media.lines.some((l) => l.event === "cert_reloaded" && l.serial === serial), 10_000),
        "and taken into use",
      );
      // Keep the traffic up a little longer: new connections to media now meet the new certificate.
      const seen = results.length;
      await eventually(() => results.length >= seen + 20, 30_000);
      running = false;
      await Promise.all(workers);
      const after = await presented("media");
      t.not(after, before, `media now presents ${after} instead of ${before}`);
      t.equal(after, serial, "the renewed certificate");
      const failed = results.filter((r) => r.status !== 200);
      t.ok(results.length >= 40, `${results.length} posts during the renewal`);
      t.same(failed, [], "not one failed");
    });

    await t.test("a revocation in the CA's CRL cuts boards off on every host", async (t) => {
      const boards = (await (await request(`${admin("boards")}/status`)).body.json()) as {
        identity: { server: { serial: string } };
      };
      const serial = boards.identity.server.serial;
      const startedAt = Date.now();
      await crl.revoke(serial);
      const everywhere = await eventually(async () => {
        for (const s of mesh.services) {
          const status = (await (await request(`${admin(s.key)}/status`)).body.json()) as {
            identity: { crl: Array<{ revoked: number }> };
          };
          if (!status.identity.crl.some((c) => c.revoked > 0)) return false;
        }
        return true;
      }, 20_000);
      const took = Date.now() - startedAt;
      t.ok(
        everywhere,
        `every sidecar on every host took the new CRL, ${took} ms after it was published (refresh every ${CRL_REFRESH_MS} ms)`,
      );

      // Host 1: the gateway refuses boards as a server.
      const { status, report } = await post();
      t.equal(status, 502, "the post fails at boards");
      const hop = report?.calls.find((c) => c.to === "boards.ashchan.local");
      t.match(hop?.error, /peer_revoked/, `gateway's sidecar: ${hop?.error?.slice(0, 120)}`);
      // Hosts 2 and 3: media, moderation and search refuse boards as a client (via boards's own outbound).
      const boardsService = service(mesh, "boards");
      for (const call of boardsService.calls) {
        const target = service(mesh, call.to);
        const r = await run(
          net.exec(net.hosts[hostOf("boards")] as string)[0] as string,
          [
            ...net.exec(net.hosts[hostOf("boards")] as string).slice(1),
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-x",
            `http://${boardsService.local}:${mesh.ports.outbound}`,
            "-X",
            call.method,
            `http://${target.dnsName}${call.path}`,
          ],
          { timeoutMs: 30_000 },
        );
        t.equal(r.out, "502", `boards → ${call.to} (host ${hostOf(call.to) + 1}): 502`);
        const metrics = await (await request(`${admin(call.to)}/metrics`)).body.text();
        t.ok(
          sample(metrics, "mtls_handshake_failures", { direction: "inbound", reason: "revoked" }) >= 1,
          `${call.to} refused boards's certificate as revoked`,
        );
      }
      const auth = await (await request(`${admin("auth")}/metrics`)).body.text();
      t.ok(
        sample(auth, "mtls_crl_fetch_total", { url: crl.urls[0] as string, result: "ok" }) >= 2,
        "the CRL was fetched from the CA's distribution point",
      );
    });
  },
);
