// The Ashchan mesh on Podman, as an operator starts it (README, "Run the mesh on Podman"): the
// image built by compose/build-image.sh on a local base, certificates from `certs issue-all`,
// compose/podman-compose.yml run by podman-compose. Fourteen containers: six stand-in apps, each
// with its sidecar in the app's network namespace, and Redis (an image built from this machine's
// redis-server) with its sidecar. Then, from the outside:
// - a post crosses every edge of the mesh file, and each app sees its caller's verified identity;
//   boards has search index it over gRPC (its app dials 127.0.0.1:15005, which its sidecar maps to
//   search, whose sidecar speaks h2c to search's app);
// - search's gRPC method answers boards' identity and refuses a trusted identity that is not its
//   caller with PERMISSION_DENIED; its HTTP route, on the same h2c app, answers an HTTP/1.1 caller;
// - boards' app reaches Redis on its own 127.0.0.1:6379, through its sidecar's tcp.outbound and
//   Redis's sidecar's tcp.inbound; from the mesh network, no certificate, a foreign CA or a trusted
//   identity that is not a client gets no byte from Redis, and Redis sees no connection;
// - a container on the mesh network without a certificate is refused at every :8443, and cannot
//   reach any app's plain port; a foreign CA's certificate is refused; a trusted identity that is
//   not on the allow-list gets 403;
// - rotating certificates while requests flow fails none of them;
// - a revoked certificate is refused within seconds.
import { X509Certificate } from "node:crypto";
import { chownSync, readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import t from "tap";
import { request as undiciRequest } from "undici";
import { DevCa } from "../certs-dev/store.js";
import { loadMesh, type Mesh, service } from "../config/mesh.js";
import { certs, tempDir } from "./lib/certs.js";
import { eventually, sample, sleep } from "./lib/mesh.js";
import { at } from "./lib/ops.js";
import {
  buildImages,
  buildRedisImage,
  compose,
  freePort,
  grpcProbe,
  type ProbeStep,
  podmanEnv,
  podmanRun,
  podmanSkip,
  probe,
  REDIS_IMAGE,
  request,
} from "./lib/podman.js";
import { redisServer } from "./lib/tcp.js";

// Building the image and starting twelve containers takes a while on two cores.
t.setTimeout(900_000);

const PROJECT = "ashmesh-e2e";
const mesh: Mesh = loadMesh(at("compose/mesh.yaml"));
const entry = service(mesh, mesh.entry.service);
const sidecarName = (dnsName: string) => dnsName.replace(/^([^.]+)/, "$1-sidecar");
const containers = [...mesh.services, ...mesh.tcp].flatMap((s) => [s.dnsName, sidecarName(s.dnsName)]);

interface HopReport {
  served_by: string;
  caller: string | null;
  xfcc: string | null;
  calls: Array<{
    to: string;
    path: string;
    protocol: "http" | "grpc";
    status: number;
    grpc_status?: number | null;
    error?: string;
    answer?: HopReport;
  }>;
}

async function logsOf(container: string): Promise<string> {
  const r = await podmanRun(["logs", container]);
  return r.output;
}

// The Redis image is made from this machine's redis-server: without it the mesh file's Redis
// cannot run, and the test says so (CI installs it; ASHMESH_REQUIRE_OPS_TOOLS=1 fails instead).
t.test("the mesh in Podman containers", { skip: podmanSkip || redisServer.skip }, async (t) => {
  // Containers of this test left by an earlier run that was killed are removed; anyone else's
  // container with one of these names (the demo mesh) stops the test instead.
  for (const name of containers) {
    const r = await podmanRun([
      "container",
      "inspect",
      "--format",
      '{{index .Config.Labels "io.podman.compose.project"}}',
      name,
    ]);
    if (r.code !== 0) continue;
    if (r.stdout.trim() !== PROJECT) {
      t.fail(`a container named ${name} exists (project "${r.stdout.trim()}"): stop that mesh first`);
      return;
    }
    await podmanRun(["rm", "-f", "-t", "2", name]);
  }

  const built = await buildImages();
  if (!t.equal(built.code, 0, `compose/build-image.sh builds the image\n${built.output.slice(-3000)}`)) return;
  const redisBuilt = await buildRedisImage();
  if (!t.equal(redisBuilt.code, 0, `compose/podman/build-redis.sh builds Redis\n${redisBuilt.output.slice(-3000)}`))
    return;

  const pkiDir = tempDir(t, "ashmesh-podman-");
  const issued = await certs(["issue-all", "--mesh", at("compose/mesh.yaml"), "--dir", pkiDir]);
  t.equal(issued.code, 0, issued.err);
  const ca = DevCa.open(pkiDir);
  // The sidecars run as 10001 (the image's user) and their keys are 0600: give each service's
  // files to that user, as the README tells operators to. Rootless Podman maps its own user to
  // root inside the container instead.
  const runAsRoot = process.getuid?.() === 0;
  if (runAsRoot) {
    for (const s of [...mesh.services, ...mesh.tcp]) {
      const dir = join(pkiDir, s.dnsName);
      chownSync(dir, 10001, 10001);
      for (const f of readdirSync(dir)) chownSync(join(dir, f), 10001, 10001);
    }
  }
  const network = `ashmesh-e2e-${process.pid}`;
  const entryPort = await freePort();
  const env = podmanEnv({
    ASHMESH_PKI: pkiDir,
    ASHMESH_NETWORK: network,
    ASHMESH_ENTRY_PORT: String(entryPort),
    ASHMESH_REDIS_IMAGE: REDIS_IMAGE,
    ...(runAsRoot ? {} : { ASHMESH_UID: "0", ASHMESH_GID: "0" }),
  });
  t.teardown(async () => {
    await compose(PROJECT, env, ["down", "-t", "5"], 180_000);
    await podmanRun(["network", "rm", "-f", network]);
  });
  const up = await compose(PROJECT, env, ["up", "-d"]);
  if (!t.equal(up.code, 0, `podman-compose up\n${up.output.slice(-3000)}`)) return;

  // Containers find each other by name only when the network has DNS: with Podman's CNI backend
  // that is the dnsname plugin (Debian: golang-github-containernetworking-plugin-dnsname).
  const dns = await podmanRun(["network", "inspect", "--format", "{{.DNSEnabled}}", network]);
  if (!t.equal(dns.stdout.trim(), "true", `the network ${network} has DNS (${dns.output.trim()})`)) {
    t.comment("install golang-github-containernetworking-plugin-dnsname (CNI) or netavark with aardvark-dns");
    return;
  }

  const entryUrl = `http://127.0.0.1:${entryPort}${mesh.entry.path}`;
  const post = async () => {
    const res = await undiciRequest(entryUrl, { method: mesh.entry.method as "POST", body: "{}" });
    return { status: res.statusCode, text: await res.body.text() };
  };
  const ready = await eventually(async () => {
    try {
      return (await post()).status === 200;
    } catch {
      return false;
    }
  }, 90_000);
  if (!ready) {
    const logs = await Promise.all(containers.map(async (c) => `--- ${c}\n${(await logsOf(c)).slice(-1500)}`));
    t.fail(`the entry request never succeeded\n${logs.join("\n")}`);
    return;
  }

  await t.test("a post crosses every edge, and each app sees its caller's verified identity", async (t) => {
    const answer = await post();
    t.equal(answer.status, 200, answer.text.slice(0, 500));
    const report = JSON.parse(answer.text) as HopReport;
    const seen: string[] = [];
    const walk = (hop: HopReport) => {
      for (const call of hop.calls) {
        seen.push(`${hop.served_by} -> ${call.to}`);
        t.equal(call.status, 200, `${hop.served_by} -> ${call.to}: ${call.error ?? "ok"}`);
        if (!call.answer) continue;
        t.equal(call.answer.served_by, call.to, `${call.to} answered`);
        t.equal(call.answer.caller, hop.served_by, `${call.to}'s app saw the caller ${hop.served_by}`);
        t.match(
          call.answer.xfcc ?? "",
          new RegExp(
            `^By=${call.to.replaceAll(".", "\\.")};Hash=[0-9a-f]{64};.*DNS=${hop.served_by.replaceAll(".", "\\.")}`,
          ),
          "in the x-forwarded-client-cert its sidecar set",
        );
        walk(call.answer);
      }
    };
    walk(report);
    const expected = mesh.services.flatMap((s) => s.calls.map((c) => `${s.dnsName} -> ${service(mesh, c.to).dnsName}`));
    t.same(seen.sort(), expected.sort(), "every edge of the mesh file, and only those");
    const boards = report.calls.find((c) => c.to === service(mesh, "boards").dnsName)?.answer;
    t.match(
      boards?.calls.find((c) => c.to === service(mesh, "search").dnsName),
      {
        protocol: "grpc",
        path: "/ashchan.search.v1.Indexer/IndexPost",
        status: 200,
        grpc_status: 0,
        answer: { served_by: "search.ashchan.local", caller: "boards.ashchan.local" },
      },
      "boards → search is a gRPC call, OK, and search's app read boards in its metadata",
    );

    const log = await logsOf(sidecarName(service(mesh, "auth").dnsName));
    const handshake = log
      .split("\n")
      .filter((l) => l.includes('"event":"mtls_handshake_complete"'))
      .map((l) => JSON.parse(l) as Record<string, string>)
      .find((l) => l.client_cn === entry.dnsName);
    t.ok(handshake, "auth's sidecar logged the handshake with the gateway");
    t.match(handshake ?? {}, { tls_version: "TLSv1.3", server_cn: "auth.ashchan.local", service: "auth-accounts" });
  });

  await t.test("on the mesh network, no certificate, a foreign CA or a wrong identity gets nowhere", async (t) => {
    const trustCa = readFileSync(DevCa.paths(pkiDir).trustCa, "utf8");
    const foreignDir = tempDir(t, "ashmesh-foreign-");
    t.equal((await certs(["init", "--dir", foreignDir])).code, 0);
    t.equal((await certs(["issue", entry.dnsName, "--dir", foreignDir])).code, 0);
    const foreign = DevCa.open(foreignDir).identityFiles(entry.dnsName);
    const search = ca.identityFiles(service(mesh, "search").dnsName);
    const auth = service(mesh, "auth");

    const steps: ProbeStep[] = [];
    for (const s of mesh.services) {
      steps.push({
        name: `no certificate -> ${s.dnsName}:8443`,
        host: s.dnsName,
        port: mesh.ports.mtls,
        tls: { ca: trustCa },
        send: request("GET", s.dnsName, "/health"),
      });
      steps.push({
        name: `plain HTTP -> ${s.dnsName}:8443`,
        host: s.dnsName,
        port: mesh.ports.mtls,
        send: request("GET", s.dnsName, "/health"),
      });
      if (s.key !== entry.key) {
        steps.push({
          name: `plain HTTP -> ${s.dnsName}:${s.appPort} (the app itself)`,
          host: s.dnsName,
          port: s.appPort,
          send: request("GET", s.dnsName, "/health"),
        });
      }
    }
    steps.push({
      name: `a foreign CA's ${entry.dnsName} -> ${auth.dnsName}:8443`,
      host: auth.dnsName,
      port: mesh.ports.mtls,
      tls: { ca: trustCa, cert: readFileSync(foreign.cert, "utf8"), key: readFileSync(foreign.key, "utf8") },
      send: request("POST", auth.dnsName, "/api/v1/verify"),
    });
    steps.push({
      name: `search (trusted, not on auth's allow-list) -> ${auth.dnsName}:8443`,
      host: auth.dnsName,
      port: mesh.ports.mtls,
      tls: { ca: trustCa, cert: readFileSync(search.cert, "utf8"), key: readFileSync(search.key, "utf8") },
      send: request("POST", auth.dnsName, "/api/v1/verify"),
    });
    const results = await probe(network, steps);
    t.equal(results.length, steps.length);
    for (const r of results) {
      if (r.name.startsWith("search")) {
        t.match(r.firstLine, /^HTTP\/1\.1 403 /, `${r.name}: 403`);
        t.match(r.body, /search\.ashchan\.local may not call POST \/api\/v1\/verify/, "naming who may not call what");
      } else if (r.name.includes("(the app itself)")) {
        t.equal(r.error, "ECONNREFUSED", `${r.name}: refused, the app listens on its own loopback only`);
      } else {
        t.equal(r.firstLine, "", `${r.name}: no HTTP answer (${r.error ?? "closed"})`);
      }
    }

    // What the sidecar counted, read from its admin port as Prometheus would.
    const [metrics] = await probe(network, [
      { name: "metrics", host: auth.dnsName, port: mesh.ports.admin, send: request("GET", auth.dnsName, "/metrics") },
    ]);
    const text = metrics?.body ?? "";
    t.ok(
      sample(text, "mtls_handshake_failures", { direction: "inbound", reason: "no_client_cert" }) >= 1,
      "no_client_cert counted",
    );
    t.ok(
      sample(text, "mtls_handshake_failures", { direction: "inbound", reason: "unknown_ca" }) >= 1,
      "unknown_ca counted",
    );
    t.ok(sample(text, "mtls_authz_denied_total", { identity: "search.ashchan.local" }) >= 1, "the 403 counted");
  });

  await t.test("search's gRPC method: boards may call it, the gateway gets PERMISSION_DENIED", async (t) => {
    const trustCa = readFileSync(DevCa.paths(pkiDir).trustCa, "utf8");
    const search = service(mesh, "search");
    const creds = (key: string) => {
      const f = ca.identityFiles(service(mesh, key).dnsName);
      return { ca: trustCa, cert: readFileSync(f.cert, "utf8"), key: readFileSync(f.key, "utf8") };
    };
    const call = { host: search.dnsName, port: mesh.ports.mtls, path: "/ashchan.search.v1.Indexer/IndexPost" };
    const [asBoards, asGateway] = await grpcProbe(network, [
      { name: "boards", ...call, tls: creds("boards"), message: '{"from":"boards"}' },
      { name: "gateway", ...call, tls: creds("gateway"), message: '{"from":"gateway"}' },
    ]);
    t.match(asBoards, { status: 200, grpcStatus: 0, error: null }, "boards' identity: OK");
    t.match(JSON.parse(asBoards?.message || "{}"), { served_by: search.dnsName, caller: "boards.ashchan.local" });
    t.match(
      asGateway,
      { status: 200, grpcStatus: 7, message: "" },
      "the gateway's (trusted, not a caller): PERMISSION_DENIED",
    );
    t.match(
      asGateway?.grpcMessage,
      /gateway\.ashchan\.local may not call POST \/ashchan\.search\.v1\.Indexer\/IndexPost/,
    );

    // search's HTTP routes are served by the same h2c app: an HTTP/1.1 caller's request is handed
    // on as HTTP/2 by search's sidecar.
    const [health] = await probe(network, [
      {
        name: "boards -> search /health over HTTP/1.1",
        host: search.dnsName,
        port: mesh.ports.mtls,
        tls: creds("boards"),
        send: request("GET", search.dnsName, "/health"),
      },
    ]);
    t.match(health?.firstLine, /^HTTP\/1\.1 200 /, "HTTP/1.1 in, HTTP/2 to the app");
    t.match(health?.body, /"service":"search-indexing"/);

    const [metrics] = await probe(network, [
      {
        name: "metrics",
        host: search.dnsName,
        port: mesh.ports.admin,
        send: request("GET", search.dnsName, "/metrics"),
      },
    ]);
    const text = metrics?.body ?? "";
    t.ok(
      sample(text, "mtls_requests_total", { direction: "inbound", peer: "boards.ashchan.local", protocol: "grpc" }) >=
        2,
      "search's sidecar counted boards' gRPC calls (the post's and this one) as protocol=grpc",
    );
    t.ok(sample(text, "mtls_authz_denied_total", { identity: "gateway.ashchan.local" }) >= 1, "the refusal counted");
  });

  await t.test("boards reaches Redis through its tcp.outbound; nobody else reaches it", async (t) => {
    const redis = mesh.tcp.find((s) => s.kind === "redis");
    if (!redis) {
      t.fail("the mesh file has a Redis");
      return;
    }
    const boards = service(mesh, "boards");
    // What boards' app would do: Redis on its own 127.0.0.1:<port>, the sidecar does the rest.
    const viaBoards = async (commands: string[][]) => {
      const resp = [...commands, ["QUIT"]]
        .map((c) => `*${c.length}\r\n${c.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`)
        .join("");
      const script = `const s = require("node:net").connect(${redis.port}, "127.0.0.1", () => s.write(${JSON.stringify(resp)}));
let out = ""; s.on("data", (d) => { out += d; }); s.on("error", (e) => { out += "ERROR " + e.code; });
s.on("close", () => process.stdout.write(out)); setTimeout(() => s.destroy(), 8000);`;
      const r = await podmanRun(["exec", boards.dnsName, "/usr/local/bin/node", "-e", script]);
      return r.stdout;
    };
    const ready = await eventually(async () => (await viaBoards([["PING"]])).startsWith("+PONG"), 60_000);
    if (!t.ok(ready, "boards' app gets +PONG from Redis")) {
      t.comment((await logsOf(sidecarName(redis.dnsName))).slice(-2000));
      return;
    }
    const first = await viaBoards([
      ["SET", "ashmesh:e2e", "over mTLS"],
      ["GET", "ashmesh:e2e"],
      ["INFO", "stats"],
    ]);
    t.match(first, /^\+OK\r\n\$9\r\nover mTLS\r\n/, "SET and GET through the tunnel");
    const connections = (text: string) => Number(/total_connections_received:(\d+)/.exec(text)?.[1] ?? Number.NaN);
    const before = connections(first);
    t.ok(before >= 1, `Redis counts its connections (${before})`);

    const trustCa = readFileSync(DevCa.paths(pkiDir).trustCa, "utf8");
    const foreignDir = tempDir(t, "ashmesh-foreign-");
    t.equal((await certs(["init", "--dir", foreignDir])).code, 0);
    t.equal((await certs(["issue", boards.dnsName, "--dir", foreignDir])).code, 0);
    const foreign = DevCa.open(foreignDir).identityFiles(boards.dnsName);
    const search = ca.identityFiles(service(mesh, "search").dnsName);
    const PING = "*1\r\n$4\r\nPING\r\n";
    const steps: ProbeStep[] = [
      { name: "no certificate", host: redis.dnsName, port: redis.mtlsPort, tls: { ca: trustCa }, send: PING },
      {
        name: "a foreign CA's boards",
        host: redis.dnsName,
        port: redis.mtlsPort,
        tls: { ca: trustCa, cert: readFileSync(foreign.cert, "utf8"), key: readFileSync(foreign.key, "utf8") },
        send: PING,
      },
      {
        name: "search (trusted, not a client)",
        host: redis.dnsName,
        port: redis.mtlsPort,
        tls: { ca: trustCa, cert: readFileSync(search.cert, "utf8"), key: readFileSync(search.key, "utf8") },
        send: PING,
      },
      { name: "plain TCP to the mTLS port", host: redis.dnsName, port: redis.mtlsPort, send: PING },
      { name: "plain TCP to Redis itself", host: redis.dnsName, port: redis.port, send: PING },
    ];
    for (const r of await probe(network, steps)) {
      if (r.name === "plain TCP to Redis itself")
        t.equal(r.error, "ECONNREFUSED", `${r.name}: refused, Redis listens on its own loopback only`);
      else t.equal(r.firstLine, "", `${r.name}: not one byte back (${r.error ?? "closed"})`);
    }
    const after = connections(await viaBoards([["INFO", "stats"]]));
    t.equal(after, before + 1, "Redis saw no connection but boards' own (the refused peers never reached it)");

    const [metrics] = await probe(network, [
      { name: "metrics", host: redis.dnsName, port: mesh.ports.admin, send: request("GET", redis.dnsName, "/metrics") },
    ]);
    const text = metrics?.body ?? "";
    t.ok(sample(text, "mtls_authz_denied_total", { identity: service(mesh, "search").dnsName, route: redis.key }) >= 1);
    t.ok(sample(text, "mtls_handshake_failures", { direction: "inbound", reason: "no_client_cert" }) >= 1);
    t.ok(sample(text, "mtls_handshake_failures", { direction: "inbound", reason: "unknown_ca" }) >= 1);
    t.ok(
      sample(text, "mtls_tcp_bytes_total", { direction: "inbound", listener: redis.key, flow: "in" }) > 0,
      "the Redis sidecar counted the bytes it carried",
    );
    const handshake = (await logsOf(sidecarName(redis.dnsName)))
      .split("\n")
      .filter((l) => l.includes('"event":"mtls_handshake_complete"'))
      .map((l) => JSON.parse(l) as Record<string, string>)
      .find((l) => l.client_cn === boards.dnsName);
    t.match(handshake, { listener: redis.key, server_cn: redis.dnsName, tls_version: "TLSv1.3" });
  });

  await t.test("rotating certificates while posts flow fails none of them", async (t) => {
    const rotated = ["auth", "boards"].map((k) => service(mesh, k).dnsName);
    const results: number[] = [];
    let running = true;
    const load = (async () => {
      const end = Date.now() + 60_000;
      while (running && Date.now() < end && results.length < 2_000) {
        try {
          results.push((await post()).status);
        } catch {
          results.push(0);
        }
      }
    })();
    await sleep(1_500);
    for (const name of rotated) {
      const r = await certs(["rotate", name, "--dir", pkiDir]);
      t.equal(r.code, 0, r.err);
    }
    for (const name of rotated) {
      const reloaded = await eventually(
        async () => (await logsOf(sidecarName(name))).includes('"event":"cert_reloaded"'),
        20_000,
      );
      t.ok(reloaded, `${name}'s sidecar reloaded its certificate`);
    }
    await sleep(1_500);
    running = false;
    await load;
    t.ok(results.length >= 10, `posts flowed during the rotation (${results.length})`);
    t.same(
      results.filter((s) => s !== 200),
      [],
      "not one failed",
    );
    const [presented] = await probe(network, [
      {
        name: "auth's certificate",
        host: rotated[0] as string,
        port: mesh.ports.mtls,
        tls: {
          ca: readFileSync(DevCa.paths(pkiDir).trustCa, "utf8"),
          cert: readFileSync(ca.identityFiles(entry.dnsName).cert, "utf8"),
          key: readFileSync(ca.identityFiles(entry.dnsName).key, "utf8"),
        },
        send: request("GET", rotated[0] as string, "/health"),
      },
    ]);
    const current = new X509Certificate(readFileSync(ca.identityFiles(rotated[0] as string).cert));
    t.equal(presented?.peerSerial, current.serialNumber, "auth's sidecar presents the new certificate");
  });

  await t.test("a revoked certificate is refused within seconds", async (t) => {
    const revoked = await certs(["revoke", entry.dnsName, "--dir", pkiDir]);
    t.equal(revoked.code, 0, revoked.err);
    // Each callee's sidecar sees the new CRL on its own (within a second or so of the write).
    let calls: HopReport["calls"] = [];
    const started = Date.now();
    const refused = await eventually(async () => {
      calls = (JSON.parse((await post()).text) as HopReport).calls;
      return calls.every((c) => c.status !== 200);
    }, 10_000);
    t.ok(
      refused,
      `every call of the gateway is refused after ${Date.now() - started} ms: ${calls.map((c) => `${c.to} ${c.status}`).join(", ")}`,
    );
    const log = await logsOf(sidecarName(service(mesh, "auth").dnsName));
    // The open connection from the gateway is closed when the CRL arrives, new ones are refused.
    t.match(
      log,
      /"event":"mtls_connection_revoked".*"identity":"gateway\.ashchan\.local"|"event":"mtls_handshake_failed".*"reason":"revoked"/,
      "auth's sidecar logged why",
    );
  });
});
