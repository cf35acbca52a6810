// compose/podman-compose.yml is generated from compose/mesh.yaml (compose/generate-compose.ts):
// the file on disk must be what the generator makes now, and what it makes must keep the mesh's
// security properties: every sidecar shares its app's network namespace, only the entry app is
// published and only on the host's loopback, identity files are mounted read-only and the CA's
// own key never is, the allow-lists and destinations are the mesh file's edges; a TCP server
// (Redis) listens on its own loopback only, behind its sidecar's tcp.inbound, which allows
// exactly its clients, whose sidecars reach it through a tcp.outbound on their loopback; a gRPC
// server's sidecar speaks h2c to its app (APP_PROTOCOL), and each of its gRPC callers' sidecars
// maps a port on the caller's loopback to it (OUTBOUND_UPSTREAMS).
import { readFileSync } from "node:fs";
import t from "tap";
import { parse } from "yaml";
import { COMPOSE_FILE, generateCompose, MESH_FILE } from "../compose/generate-compose.js";
import { parseConfig } from "../config/load.js";
import { grpcCallees, loadMesh, service, tcpServersOf } from "../config/mesh.js";
import type { ConfigInput } from "../config/schema.js";

interface ComposeService {
  container_name: string;
  image: string;
  command?: string[];
  entrypoint?: string[];
  network_mode?: string;
  networks?: string[];
  ports?: string[];
  user?: string;
  environment: Record<string, string>;
  volumes?: string[];
  read_only?: boolean;
  cap_drop?: string[];
  security_opt?: string[];
}

const mesh = loadMesh(MESH_FILE);
const generated = generateCompose(mesh);

t.test("the committed file is the generator's output for compose/mesh.yaml", async (t) => {
  t.equal(
    readFileSync(COMPOSE_FILE, "utf8"),
    generated,
    "compose/podman-compose.yml is stale: run `npx tsx compose/generate-compose.ts` and commit it",
  );
});

t.test("what the generator makes keeps the mesh's properties", async (t) => {
  const doc = parse(generated) as { services: Record<string, ComposeService> };
  const names = Object.keys(doc.services);
  t.same(
    names.sort(),
    [...mesh.services, ...mesh.tcp].flatMap((s) => [s.key, `${s.key}-sidecar`]).sort(),
    "an app and a sidecar per service and per TCP server",
  );

  for (const s of mesh.services) {
    const app = doc.services[s.key] as ComposeService;
    const sidecar = doc.services[`${s.key}-sidecar`] as ComposeService;
    t.equal(app.container_name, s.dnsName, `${s.key}: the app's container answers to ${s.dnsName} on the network`);
    t.equal(
      sidecar.network_mode,
      `container:${s.dnsName}`,
      `${s.key}: the sidecar lives in the app's network namespace`,
    );
    t.notOk(sidecar.ports, `${s.key}: the sidecar publishes nothing on the host`);
    for (const c of [app, sidecar]) {
      t.equal(c.read_only, true, `${c.container_name}: read-only root`);
      t.same(c.cap_drop, ["ALL"], `${c.container_name}: no capabilities`);
      t.same(c.security_opt, ["no-new-privileges"]);
    }

    const entry = mesh.entry.service === s.key;
    if (entry) {
      t.same(
        app.ports,
        [`127.0.0.1:\${ASHMESH_ENTRY_PORT:-${s.appPort}}:${s.appPort}`],
        "the entry app, on 127.0.0.1 only",
      );
    } else {
      t.notOk(app.ports, `${s.key}: not published`);
      t.equal(app.environment.STANDIN_HOST, "127.0.0.1", `${s.key}: the app listens where only its sidecar reaches it`);
    }

    const env = sidecar.environment;
    t.equal(env.SERVICE_DNS_NAME, s.dnsName);
    t.equal(env.MTLS_VERIFY_CLIENT, "true");
    t.equal(env.MTLS_MIN_TLS_VERSION, "TLSv1.3");
    t.same(
      env.MTLS_ALLOW === "" ? [] : (env.MTLS_ALLOW ?? "").split(","),
      s.callers.map((c) => service(mesh, c).dnsName),
      `${s.key}: allows exactly its callers`,
    );
    t.same(
      env.OUTBOUND_DESTINATIONS === "" ? [] : (env.OUTBOUND_DESTINATIONS ?? "").split(","),
      [...new Set(s.calls.map((c) => service(mesh, c.to).dnsName))],
      `${s.key}: may call exactly the services it calls`,
    );
    t.equal(env.OUTBOUND_LISTEN, `127.0.0.1:${mesh.ports.outbound}`, "the forward proxy is for its own app only");
    t.equal(app.environment.HTTP_PROXY, `http://127.0.0.1:${mesh.ports.outbound}`, "the app calls out through it");

    t.same(
      sidecar.volumes,
      [
        `\${ASHMESH_PKI:-../.ashmesh/pki}/${s.dnsName}:/etc/mtls/identity:ro`,
        `\${ASHMESH_PKI:-../.ashmesh/pki}/trust:/etc/mtls/trust:ro`,
      ],
      `${s.key}: its own identity and the trust bundle, read-only`,
    );
    t.notOk(app.volumes, `${s.key}: the app mounts no key`);
    t.notMatch(generated, /\/ca:/, "the CA's directory is never mounted");
    t.match(sidecar.user ?? "", /^\$\{ASHMESH_UID:-10001\}:\$\{ASHMESH_GID:-10001\}$/, "not root by default");
    const tcpOutbound = JSON.parse(env.TCP_OUTBOUND ?? "[]") as NonNullable<ConfigInput["tcp"]>["outbound"];
    t.same(
      tcpOutbound,
      tcpServersOf(mesh, s.key).map((server) => ({
        name: server.key,
        listen: `127.0.0.1:${server.port}`,
        target: `${server.dnsName}:${server.mtlsPort}`,
        identity: server.dnsName,
      })),
      `${s.key}: a tcp.outbound on its loopback to each TCP server it is a client of, and no other`,
    );
    t.equal(env.APP_PROTOCOL, s.appProtocol === "h2c" ? "h2c" : undefined, `${s.key}: what its app speaks`);
    t.same(
      JSON.parse(env.OUTBOUND_UPSTREAMS ?? "{}"),
      Object.fromEntries(
        grpcCallees(mesh, s.key).map((callee) => [
          callee.key,
          { listen: `127.0.0.1:${callee.upstreamPort}`, target: `${callee.dnsName}:${mesh.ports.mtls}` },
        ]),
      ),
      `${s.key}: a mapped port on its loopback to each service it calls over gRPC, and no other`,
    );
  }
  const search = doc.services["search-sidecar"] as ComposeService;
  t.equal(search.environment.APP_PROTOCOL, "h2c", "search's app serves gRPC: its sidecar speaks HTTP/2 to it");
  t.same(JSON.parse((doc.services["boards-sidecar"] as ComposeService).environment.OUTBOUND_UPSTREAMS ?? "{}"), {
    search: { listen: "127.0.0.1:15005", target: "search.ashchan.local:8443" },
  });

  t.ok(mesh.tcp.length > 0, "the mesh has a TCP server");
  for (const server of mesh.tcp) {
    const app = doc.services[server.key] as ComposeService;
    const sidecar = doc.services[`${server.key}-sidecar`] as ComposeService;
    t.equal(app.container_name, server.dnsName);
    t.notOk(app.ports, `${server.key}: not published`);
    t.match(
      app.command?.join(" "),
      new RegExp(`^--bind 127\\.0\\.0\\.1 --port ${server.port} `),
      "on its loopback only",
    );
    t.equal(sidecar.network_mode, `container:${server.dnsName}`, "its sidecar in its network namespace");
    for (const c of [app, sidecar]) {
      t.equal(c.read_only, true, `${c.container_name}: read-only root`);
      t.same(c.cap_drop, ["ALL"], `${c.container_name}: no capabilities`);
    }
    const env = sidecar.environment;
    t.equal(env.MTLS_ENABLED, "false", "no HTTP inbound");
    t.equal(env.OUTBOUND_ENABLED, "false", "no HTTP outbound");
    t.same(JSON.parse(env.TCP_INBOUND ?? "[]"), [
      {
        name: server.key,
        listen: `0.0.0.0:${server.mtlsPort}`,
        target: `127.0.0.1:${server.port}`,
        allow: server.clients.map((c) => service(mesh, c).dnsName),
      },
    ]);
    t.same(sidecar.volumes, [
      `\${ASHMESH_PKI:-../.ashmesh/pki}/${server.dnsName}:/etc/mtls/identity:ro`,
      `\${ASHMESH_PKI:-../.ashmesh/pki}/trust:/etc/mtls/trust:ro`,
    ]);
  }
});

t.test("every sidecar's environment is a configuration the sidecar accepts", async (t) => {
  const doc = parse(generated) as { services: Record<string, ComposeService> };
  for (const [name, c] of Object.entries(doc.services)) {
    if (!name.endsWith("-sidecar")) continue;
    const config = parseConfig({}, { env: c.environment, source: name });
    t.equal(config.service.dnsName, c.environment.SERVICE_DNS_NAME, `${name}: valid`);
  }
  const redis = parseConfig({}, { env: (doc.services["redis-sidecar"] as ComposeService).environment });
  t.match(redis, { inbound: { enabled: false }, outbound: { enabled: false } });
  t.match(redis.tcp.inbound, [{ name: "redis", listen: { host: "0.0.0.0", port: 6380 }, target: "127.0.0.1:6379" }]);
  const search = parseConfig({}, { env: (doc.services["search-sidecar"] as ComposeService).environment });
  t.equal(search.inbound.appProtocol, "h2c", "APP_PROTOCOL sets inbound.appProtocol");
  const boards = parseConfig({}, { env: (doc.services["boards-sidecar"] as ComposeService).environment });
  t.match(boards.outbound.upstreams, {
    search: { listen: { host: "127.0.0.1", port: 15005 }, target: "search.ashchan.local:8443", pin: null },
  });
});

t.test("a change in the mesh file changes the compose file", async (t) => {
  const changed = structuredClone(mesh);
  const auth = changed.services.find((s) => s.key === "auth");
  if (!auth) throw new Error("the mesh file has no auth service");
  auth.callers = [...auth.callers, "search"];
  const text = generateCompose(changed);
  t.not(text, generated);
  t.match(text, /MTLS_ALLOW: "?gateway\.ashchan\.local,search\.ashchan\.local"?/);
});
