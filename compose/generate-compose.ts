// compose/podman-compose.yml is generated from compose/mesh.yaml by this file, so that the
// containers, their names, the sidecars' environment and allow-lists never drift from the mesh
// file that `ashmesh up`, `certs issue-all` and `check --mesh` read.
//
//   npx tsx compose/generate-compose.ts [--check] [--mesh FILE] [--out FILE]
//
// --check writes nothing and exits 1 when the file on disk differs from a fresh generation
// (test/podman-compose-file-is-generated.test.ts does the same).
import { readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import {
  containerSidecarEnv,
  containerTcpSidecarEnv,
  grpcCallees,
  loadMesh,
  type Mesh,
  type MeshService,
  type MeshTcpServer,
  service,
  tcpServersOf,
} from "../config/mesh.js";

export const MESH_FILE = fileURLToPath(new URL("./mesh.yaml", import.meta.url));
export const COMPOSE_FILE = fileURLToPath(new URL("./podman-compose.yml", import.meta.url));

/** Where the image puts the package (compose/Containerfile). */
const APP_ROOT = "/opt/ashmesh";
const NODE = "/usr/local/bin/node";
// biome-ignore lint/suspicious/noTemplateCurlyInString: a compose variable, expanded by podman-compose
const IMAGE = "${ASHMESH_IMAGE:-localhost/ashmesh:latest}";
// biome-ignore lint/suspicious/noTemplateCurlyInString: a compose variable, expanded by podman-compose
const PKI = "${ASHMESH_PKI:-../.ashmesh/pki}";
// biome-ignore lint/suspicious/noTemplateCurlyInString: a compose variable, expanded by podman-compose
const REDIS_IMAGE = "${ASHMESH_REDIS_IMAGE:-docker.io/library/redis:7-bookworm}";
const NETWORK = "ashchan-mesh";

/** The sidecar of a service shares the app container's network namespace: it has no name in DNS. */
export function appContainer(s: MeshService | MeshTcpServer): string {
  return s.dnsName;
}
export function sidecarContainer(s: MeshService | MeshTcpServer): string {
  const [first, ...rest] = s.dnsName.split(".");
  return [`${first}-sidecar`, ...rest].join(".");
}

/**
 * A YAML scalar: plain for words and paths that no YAML 1.1 reader (PyYAML, in podman-compose)
 * takes for a boolean, a number or null; anything else as a JSON string, which is valid YAML.
 */
function scalar(value: string): string {
  return /^[A-Za-z_/][A-Za-z0-9_/.@-]*$/.test(value) && !/^(y|n|yes|no|true|false|on|off|null)$/i.test(value)
    ? value
    : JSON.stringify(value);
}

function flow(values: string[]): string {
  return `[${values.map(scalar).join(", ")}]`;
}

function hardening(lines: string[]): void {
  lines.push("    read_only: true", "    cap_drop: [ALL]", "    security_opt: [no-new-privileges]");
}

function appService(mesh: Mesh, s: MeshService): string[] {
  const entry = mesh.entry.service === s.key;
  const lines = [
    `  ${s.key}:`,
    `    # ${s.serviceName}: the stand-in app (${
      s.appProtocol === "h2c" ? "HTTP/2 cleartext, gRPC and HTTP," : "plain HTTP"
    } on :${s.appPort}); calls its peers through HTTP_PROXY${grpcCallees(mesh, s.key).length ? ", gRPC ones on mapped ports" : ""}.`,
    `    container_name: ${scalar(appContainer(s))}`,
    `    image: ${scalar(IMAGE)}`,
    `    entrypoint: ${flow([NODE, `${APP_ROOT}/dist/compose/standin.js`])}`,
    "    environment:",
    `      STANDIN_SERVICE: ${scalar(s.key)}`,
    // The entry app is published on the host, so it listens on the namespace's interfaces; every
    // other app listens on loopback only, where nothing but its own sidecar can reach it.
    `      STANDIN_HOST: ${scalar(entry ? "0.0.0.0" : "127.0.0.1")}`,
    `      MESH_FILE: ${scalar(`${APP_ROOT}/compose/mesh.yaml`)}`,
    `      HTTP_PROXY: ${scalar(`http://127.0.0.1:${mesh.ports.outbound}`)}`,
    `    networks: [${NETWORK}]`,
  ];
  if (entry) {
    lines.push(
      "    # The entry request of the demo, from this host only.",
      `    ports: [${scalar(`127.0.0.1:\${ASHMESH_ENTRY_PORT:-${s.appPort}}:${s.appPort}`)}]`,
    );
  }
  hardening(lines);
  return lines;
}

function sidecarService(mesh: Mesh, s: MeshService): string[] {
  const env = containerSidecarEnv(mesh, s.key);
  const calls = [...new Set(s.calls.map((c) => service(mesh, c.to).key))];
  const tcp = tcpServersOf(mesh, s.key).map((server) => `; tcp 127.0.0.1:${server.port} → ${server.key}`);
  const grpc = grpcCallees(mesh, s.key).map((callee) => `; gRPC 127.0.0.1:${callee.upstreamPort} → ${callee.key}`);
  const lines = [
    `  ${s.key}-sidecar:`,
    `    # ${s.dnsName}'s sidecar: mTLS :${mesh.ports.mtls} → the app; HTTP_PROXY 127.0.0.1:${mesh.ports.outbound} → ${
      calls.length ? calls.join(", ") : "nobody"
    }${grpc.join("")}${tcp.join("")}; admin :${mesh.ports.admin}.`,
    `    container_name: ${scalar(sidecarContainer(s))}`,
    `    image: ${scalar(IMAGE)}`,
    "    command: [proxy]",
    `    network_mode: ${scalar(`container:${appContainer(s)}`)}`,
    `    depends_on: [${s.key}]`,
    "    # The owner of the key files (0600) on the host: see ASHMESH_UID above.",
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a compose variable, expanded by podman-compose
    `    user: ${scalar("${ASHMESH_UID:-10001}:${ASHMESH_GID:-10001}")}`,
    "    environment:",
    ...Object.entries(env).map(([k, v]) => `      ${k}: ${scalar(v)}`),
    "    volumes:",
    "      # Directories, not files: a certificate replaced by rename is seen by the sidecar's watcher.",
    `      - ${scalar(`${PKI}/${s.dnsName}:/etc/mtls/identity:ro`)}`,
    `      - ${scalar(`${PKI}/trust:/etc/mtls/trust:ro`)}`,
  ];
  hardening(lines);
  return lines;
}

/** A TCP server's container: the server alone, on loopback of its own network namespace. */
function tcpServerService(server: MeshTcpServer): string[] {
  const lines = [
    `  ${server.key}:`,
    `    # ${server.serviceName}: redis-server on 127.0.0.1:${server.port}, reached only through its sidecar's :${server.mtlsPort}.`,
    `    container_name: ${scalar(appContainer(server))}`,
    `    image: ${scalar(REDIS_IMAGE)}`,
    "    entrypoint: [/usr/local/bin/redis-server]",
    // No persistence: the demo's Redis is a cache, and the root file system is read-only.
    `    command: ${flow(["--bind", "127.0.0.1", "--port", String(server.port), "--save", "", "--appendonly", "no"])}`,
    "    # The public image's redis user.",
    `    user: ${scalar("999:999")}`,
    `    networks: [${NETWORK}]`,
  ];
  hardening(lines);
  return lines;
}

function tcpSidecarService(mesh: Mesh, server: MeshTcpServer): string[] {
  const env = containerTcpSidecarEnv(mesh, server.key);
  const lines = [
    `  ${server.key}-sidecar:`,
    `    # ${server.dnsName}'s sidecar: tcp.inbound mTLS :${server.mtlsPort} → 127.0.0.1:${server.port} for ${
      server.clients.join(", ") || "nobody"
    }; admin :${mesh.ports.admin}.`,
    `    container_name: ${scalar(sidecarContainer(server))}`,
    `    image: ${scalar(IMAGE)}`,
    "    command: [proxy]",
    `    network_mode: ${scalar(`container:${appContainer(server)}`)}`,
    `    depends_on: [${server.key}]`,
    "    # The owner of the key files (0600) on the host: see ASHMESH_UID above.",
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a compose variable, expanded by podman-compose
    `    user: ${scalar("${ASHMESH_UID:-10001}:${ASHMESH_GID:-10001}")}`,
    "    environment:",
    ...Object.entries(env).map(([k, v]) => `      ${k}: ${scalar(v)}`),
    "    volumes:",
    `      - ${scalar(`${PKI}/${server.dnsName}:/etc/mtls/identity:ro`)}`,
    `      - ${scalar(`${PKI}/trust:/etc/mtls/trust:ro`)}`,
  ];
  hardening(lines);
  return lines;
}

/** The services some caller reaches over gRPC, with those callers' keys. */
function grpcServers(mesh: Mesh): Array<{ server: MeshService; callers: string[] }> {
  return mesh.services
    .map((server) => ({ server, callers: server.callers.filter((c) => grpcCallees(mesh, c).includes(server)) }))
    .filter((x) => x.callers.length > 0);
}

const HEADER = (
  mesh: Mesh,
  meshFile: string,
) => `# GENERATED from ${meshFile} by compose/generate-compose.ts: do not edit. Change the mesh file
# (or the generator) and run \`npx tsx compose/generate-compose.ts\`; a test fails while this file
# and a fresh generation differ.
#
# The mesh of seed 003 on Podman. Per service, two containers:
#   <name>.${mesh.domain}          the app (here the stand-in, compose/standin.ts), on the network
#                                  ${NETWORK}, where Podman's DNS answers its container name;
#   <name>-sidecar.${mesh.domain}  its ashmesh sidecar, in the app's network namespace
#                                  (network_mode: container:<app>): mTLS on :${mesh.ports.mtls}, the app's
#                                  HTTP_PROXY on 127.0.0.1:${mesh.ports.outbound}, admin on :${mesh.ports.admin}.
# Only the entry app (${mesh.entry.service}) is published, on 127.0.0.1 of the host.
#${grpcServers(mesh)
  .map(
    ({ server, callers }) => `
# ${server.dnsName}'s app speaks HTTP/2 cleartext (APP_PROTOCOL=h2c): its gRPC methods and
# its HTTP routes on one port. Its gRPC callers (${callers.join(", ")}) dial 127.0.0.1:${server.upstreamPort} of their own
# network namespace, a port their sidecar maps to it (OUTBOUND_UPSTREAMS).
#`,
  )
  .join("")}${mesh.tcp
  .map(
    (server) => `
# ${server.dnsName} is Redis (redis-server on its own 127.0.0.1:${server.port}), with its sidecar's
# tcp.inbound on :${server.mtlsPort}; the apps of ${server.clients.join(", ")} reach it on 127.0.0.1:${server.port}
# of their own network namespace, through a tcp.outbound of their sidecar.
#`,
  )
  .join("")}
# From the repository root (README, "Run the mesh on Podman"):
#   compose/build-image.sh [--base localhost/ashmesh-base:latest]
#   node dist/bin/ashmesh.js certs issue-all --mesh compose/mesh.yaml
#   podman-compose --podman-path compose/podman/podman-shim -p ashchan -f compose/podman-compose.yml up -d
# podman-compose 1.0.3 (Debian 12) needs the shim for network_mode: container:<name>.
#
# Variables (environment or compose/.env):
#   ASHMESH_IMAGE       the image of every container (default localhost/ashmesh:latest)
#   ASHMESH_PKI         the development CA's directory (default ../.ashmesh/pki, from this file):
#                       <pki>/<name>.${mesh.domain} is mounted at /etc/mtls/identity and <pki>/trust at
#                       /etc/mtls/trust, both read-only; the CA's own key (<pki>/ca) never is
#   ASHMESH_UID         the user and group the sidecars run as (default 10001:10001): the owner of
#   ASHMESH_GID         the key files, which are 0600. Rootless Podman: 0 (your own user, seen
#                       from inside the container), or \`podman unshare chown\` the files to 10001
#   ASHMESH_NETWORK     the network's name (default ${NETWORK})
#   ASHMESH_ENTRY_PORT  the port of the entry app on 127.0.0.1 (default ${service(mesh, mesh.entry.service).appPort})
#   ASHMESH_REDIS_IMAGE the Redis image (default docker.io/library/redis:7-bookworm; without a
#                       registry, compose/podman/build-redis.sh makes localhost/ashmesh-redis:latest)
`;

export function generateCompose(mesh: Mesh, meshFile = "compose/mesh.yaml"): string {
  const lines = [HEADER(mesh, meshFile), "networks:", `  ${NETWORK}:`, `    name: \${ASHMESH_NETWORK:-${NETWORK}}`];
  lines.push("", "services:");
  for (const [i, s] of mesh.services.entries()) {
    if (i > 0) lines.push("");
    lines.push(...appService(mesh, s), ...sidecarService(mesh, s));
  }
  for (const server of mesh.tcp) lines.push("", ...tcpServerService(server), ...tcpSidecarService(mesh, server));
  return `${lines.join("\n")}\n`;
}

function main(argv: string[]): number {
  const { values } = parseArgs({
    args: argv,
    options: {
      check: { type: "boolean", default: false },
      mesh: { type: "string", default: MESH_FILE },
      out: { type: "string", default: COMPOSE_FILE },
    },
    strict: true,
  });
  const text = generateCompose(loadMesh(values.mesh));
  if (values.check) {
    let current = "";
    try {
      current = readFileSync(values.out, "utf8");
    } catch {
      current = "";
    }
    if (current === text) {
      process.stdout.write(`${values.out} is up to date\n`);
      return 0;
    }
    process.stderr.write(`${values.out} differs from a fresh generation: run npx tsx compose/generate-compose.ts\n`);
    return 1;
  }
  writeFileSync(values.out, text);
  process.stdout.write(`wrote ${values.out}\n`);
  return 0;
}

if (process.argv[1] && /generate-compose\.(js|ts)$/.test(process.argv[1])) {
  try {
    process.exitCode = main(process.argv.slice(2));
  } catch (err) {
    process.stderr.write(`generate-compose: ${(err as Error).message}\n`);
    process.exitCode = 2;
  }
}
