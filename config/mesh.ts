// A whole mesh in one file (compose/mesh.yaml): its services, their names and ports, and who
// calls whom, over HTTP or gRPC; and its servers that are not HTTP (`tcp`: Redis here), each
// behind a sidecar's tcp.inbound, with the services that reach them through a tcp.outbound. It is
// the one source for `certs issue-all`, each sidecar's allow-list, `ashmesh up`, the
// podman-compose file and `ashmesh check --mesh`.
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parse as parseYaml } from "yaml";
import { z } from "zod";
import { ConfigError } from "./load.js";
import { type ConfigInput, isLoopback } from "./schema.js";

const KEY = /^[a-z][a-z0-9-]*$/;

const call = z.strictObject({
  to: z.string().regex(KEY, "expected a service key of this file"),
  /** http: through the caller's forward proxy (HTTP_PROXY); grpc: through a port its sidecar maps to the callee. */
  protocol: z.enum(["http", "grpc"]).default("http"),
  /** Default GET; a gRPC call is always POST. */
  method: z
    .string()
    .regex(/^[A-Z]+$/, "expected an upper-case HTTP method")
    .optional(),
  path: z.string().regex(/^\/\S*$/, "expected an absolute path"),
});

/** A gRPC method's path: /package.Service/Method. */
const GRPC_PATH = /^\/[A-Za-z_][\w.]*\/[A-Za-z_]\w*$/;

const serviceSchema = z.strictObject({
  /** SERVICE_NAME, as logs and metrics show it. */
  serviceName: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]*$/),
  /** Default: <key>.<domain>. */
  dnsName: z.string().optional(),
  appPort: z.number().int().min(1).max(65535),
  /** What the app speaks on appPort (its sidecar's inbound.appProtocol): h2c to serve gRPC. */
  appProtocol: z.enum(["http1", "h2c"]).default("http1"),
  /**
   * Where its gRPC callers reach it: each one's sidecar maps <the caller's loopback>:upstreamPort
   * to this service (outbound.upstreams.<key>). Required when a call with protocol: grpc names it.
   */
  upstreamPort: z.number().int().min(1).max(65535).optional(),
  /** `ashmesh up`: this service's own loopback address, so that every service can use :8443. */
  local: z.string().refine(isLoopback, "expected an address in 127.0.0.0/8"),
  calls: z.array(call).default([]),
});

const tcpServerSchema = z.strictObject({
  /** SERVICE_NAME of its sidecar. */
  serviceName: z.string().regex(/^[a-zA-Z0-9][a-zA-Z0-9._-]*$/),
  /** Default: <key>.<domain>. */
  dnsName: z.string().optional(),
  /** The server `ashmesh up` and the Podman mesh run: redis-server is the one they know. */
  kind: z.enum(["redis"]),
  /** The server's own port, on loopback beside its sidecar; also each client's local port for it. */
  port: z.number().int().min(1).max(65535),
  /** Its sidecar's tcp.inbound. */
  mtlsPort: z.number().int().min(1).max(65535),
  /** `ashmesh up`: its own loopback address. */
  local: z.string().refine(isLoopback, "expected an address in 127.0.0.0/8"),
  /** Service keys whose sidecars get a tcp.outbound to it: its allow-list. */
  clients: z.array(z.string().regex(KEY, "expected a service key of this file")).default([]),
});

const meshSchema = z.strictObject({
  domain: z.string().min(1),
  caName: z.string().min(1).default("ashchan-ca"),
  ports: z
    .strictObject({
      mtls: z.number().int().min(1).max(65535).default(8443),
      admin: z.number().int().min(1).max(65535).default(9901),
      outbound: z.number().int().min(1).max(65535).default(15001),
    })
    .prefault({}),
  services: z.record(z.string().regex(KEY, "expected a lower-case key such as auth"), serviceSchema),
  tcp: z.record(z.string().regex(KEY, "expected a lower-case key such as redis"), tcpServerSchema).default({}),
  /** The request that starts the demo flow, sent to the entry service's app. */
  entry: z.strictObject({
    service: z.string().regex(KEY),
    method: z
      .string()
      .regex(/^[A-Z]+$/)
      .default("POST"),
    path: z.string().regex(/^\/\S*$/),
  }),
});

export interface MeshCall {
  to: string;
  protocol: "http" | "grpc";
  method: string;
  path: string;
}

export interface MeshService {
  key: string;
  serviceName: string;
  dnsName: string;
  appPort: number;
  appProtocol: "http1" | "h2c";
  /** The port its gRPC callers' sidecars map to it; null when the file sets none. */
  upstreamPort: number | null;
  local: string;
  calls: MeshCall[];
  /** Keys of the services that call this one: its allow-list. */
  callers: string[];
}

/** A server that is not HTTP, behind its sidecar's tcp.inbound. */
export interface MeshTcpServer {
  key: string;
  serviceName: string;
  dnsName: string;
  kind: "redis";
  port: number;
  mtlsPort: number;
  local: string;
  /** Keys of the services that reach it: its allow-list. */
  clients: string[];
}

export interface Mesh {
  file: string;
  domain: string;
  caName: string;
  ports: { mtls: number; admin: number; outbound: number };
  services: MeshService[];
  tcp: MeshTcpServer[];
  entry: { service: string; method: string; path: string };
}

export function service(mesh: Mesh, key: string): MeshService {
  const found = mesh.services.find((s) => s.key === key);
  if (!found)
    throw new ConfigError(
      `${mesh.file}: no service "${key}" (services: ${mesh.services.map((s) => s.key).join(", ")})`,
    );
  return found;
}

/** Every edge of the mesh, caller → callee, as declared by `calls`. */
export function edges(mesh: Mesh): Array<{ from: MeshService; to: MeshService }> {
  const out: Array<{ from: MeshService; to: MeshService }> = [];
  for (const from of mesh.services) {
    for (const key of new Set(from.calls.map((c) => c.to))) out.push({ from, to: service(mesh, key) });
  }
  return out;
}

export function parseMesh(input: unknown, file = "mesh"): Mesh {
  const result = meshSchema.safeParse(input);
  if (!result.success) {
    const lines = result.error.issues.map((i) =>
      i.code === "unrecognized_keys"
        ? `unknown key ${i.keys.map((k) => `"${[...i.path, k].join(".")}"`).join(", ")}`
        : `${i.path.join(".") || "the file"}: ${i.message}`,
    );
    throw new ConfigError(`${file}:\n  ${lines.join("\n  ")}`);
  }
  const m = result.data;
  const services: MeshService[] = Object.entries(m.services).map(([key, s]) => ({
    key,
    serviceName: s.serviceName,
    dnsName: s.dnsName ?? `${key}.${m.domain}`,
    appPort: s.appPort,
    appProtocol: s.appProtocol,
    upstreamPort: s.upstreamPort ?? null,
    local: s.local,
    calls: s.calls.map((c) => ({
      to: c.to,
      protocol: c.protocol,
      method: c.method ?? (c.protocol === "grpc" ? "POST" : "GET"),
      path: c.path,
    })),
    callers: [],
  }));
  const problems: string[] = [];
  for (const s of services) {
    for (const [i, c] of s.calls.entries()) {
      const callee = services.find((x) => x.key === c.to);
      if (!callee) problems.push(`services.${s.key}.calls: "${c.to}" is not a service of this file`);
      else if (!callee.callers.includes(s.key)) callee.callers.push(s.key);
      if (c.protocol !== "grpc") continue;
      const at = `services.${s.key}.calls.${i}`;
      if (c.method !== "POST") problems.push(`${at}.method: a gRPC call is a POST, not ${c.method}`);
      if (!GRPC_PATH.test(c.path))
        problems.push(`${at}.path: "${c.path}" is not a gRPC method (expected /package.Service/Method)`);
      if (callee && callee.appProtocol !== "h2c")
        problems.push(`${at}: a gRPC call to ${callee.key} needs services.${callee.key}.appProtocol: h2c`);
      if (callee && callee.upstreamPort === null)
        problems.push(`${at}: a gRPC call to ${callee.key} needs services.${callee.key}.upstreamPort`);
    }
  }
  const tcp: MeshTcpServer[] = Object.entries(m.tcp).map(([key, s]) => ({
    key,
    serviceName: s.serviceName,
    dnsName: s.dnsName ?? `${key}.${m.domain}`,
    kind: s.kind,
    port: s.port,
    mtlsPort: s.mtlsPort,
    local: s.local,
    clients: [...new Set(s.clients)],
  }));
  for (const server of tcp) {
    if (services.some((s) => s.key === server.key))
      problems.push(`tcp.${server.key}: "${server.key}" is also a service: one name, one identity`);
    for (const c of server.clients)
      if (!services.some((s) => s.key === c))
        problems.push(`tcp.${server.key}.clients: "${c}" is not a service of this file`);
  }
  // A caller's mapped ports live on its loopback (in Podman, the app's network namespace) beside
  // the sidecar's own listeners and the TCP servers' local ports: one number, one listener.
  const taken = new Map<number, string>([
    [m.ports.mtls, "ports.mtls"],
    [m.ports.admin, "ports.admin"],
    [m.ports.outbound, "ports.outbound"],
    ...services.map((s) => [s.appPort, `services.${s.key}.appPort`] as [number, string]),
    ...tcp.map((s) => [s.port, `tcp.${s.key}.port`] as [number, string]),
  ]);
  for (const s of services) {
    if (s.upstreamPort === null) continue;
    const other = taken.get(s.upstreamPort);
    if (other) problems.push(`services.${s.key}.upstreamPort: ${s.upstreamPort} is already ${other}`);
    taken.set(s.upstreamPort, `services.${s.key}.upstreamPort`);
  }
  const locals = new Map<string, string>();
  for (const s of [...services, ...tcp]) {
    const other = locals.get(s.local);
    if (other) problems.push(`services.${s.key}.local: ${s.local} is already used by ${other}`);
    locals.set(s.local, s.key);
  }
  if (!services.some((s) => s.key === m.entry.service))
    problems.push(`entry.service: "${m.entry.service}" is not a service of this file`);
  if (problems.length) throw new ConfigError(`${file}:\n  ${problems.join("\n  ")}`);
  return { file, domain: m.domain, caName: m.caName, ports: m.ports, services, tcp, entry: m.entry };
}

export function loadMesh(file: string): Mesh {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new ConfigError(
      `${file}: cannot read the mesh file: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
  let input: unknown;
  try {
    input = parseYaml(text, { uniqueKeys: true });
  } catch (err) {
    throw new ConfigError(`${file}: not valid YAML: ${(err as Error).message.split("\n")[0]}`);
  }
  return parseMesh(input, file);
}

/**
 * One sidecar's configuration on this machine (`ashmesh up`): every listener on the service's
 * own loopback address, peers resolved to theirs, certificates from the dev CA in `pkiDir`.
 */
export function localSidecarInput(mesh: Mesh, key: string, pkiDir: string): ConfigInput {
  const s = service(mesh, key);
  const resolve: Record<string, string> = {};
  for (const other of mesh.services)
    if (other.key !== key) resolve[other.dnsName] = `${other.local}:${mesh.ports.mtls}`;
  return {
    service: { name: s.serviceName, dnsName: s.dnsName },
    tls: {
      cert: join(pkiDir, s.dnsName, "server.crt"),
      key: join(pkiDir, s.dnsName, "server.key"),
      ca: join(pkiDir, "trust", "ca.crt"),
      crl: join(pkiDir, "trust", "ca.crl"),
    },
    inbound: {
      listen: `${s.local}:${mesh.ports.mtls}`,
      app: `http://${s.local}:${s.appPort}`,
      appProtocol: s.appProtocol,
      allow: s.callers.map((c) => service(mesh, c).dnsName),
    },
    outbound: {
      listen: `${s.local}:${mesh.ports.outbound}`,
      destinations: [...new Set(s.calls.map((c) => service(mesh, c.to).dnsName))],
      resolve,
      upstreams: grpcUpstreams(mesh, key, s.local),
    },
    admin: { listen: `${s.local}:${mesh.ports.admin}` },
    // Each TCP server it is a client of, on its own address at the server's port (the server's own
    // sidecar is on the server's address).
    tcp: {
      outbound: tcpServersOf(mesh, key).map((server) => ({
        name: server.key,
        listen: `${s.local}:${server.port}`,
        target: `${server.local}:${server.mtlsPort}`,
        identity: server.dnsName,
      })),
    },
  };
}

/** The services `key` calls over gRPC. */
export function grpcCallees(mesh: Mesh, key: string): MeshService[] {
  const keys = new Set(service(mesh, key).calls.flatMap((c) => (c.protocol === "grpc" ? [c.to] : [])));
  return [...keys].map((k) => service(mesh, k));
}

/**
 * The outbound.upstreams of `key`'s sidecar: each service it calls over gRPC on `host` (its
 * loopback) at that service's upstreamPort, to the service's inbound. A gRPC client wants a
 * plain host:port to dial (cleartext HTTP/2, prior knowledge), not an HTTP proxy.
 */
export function grpcUpstreams(
  mesh: Mesh,
  key: string,
  host: string,
): Record<string, { listen: string; target: string }> {
  return Object.fromEntries(
    grpcCallees(mesh, key).map((callee) => [
      callee.key,
      { listen: `${host}:${callee.upstreamPort}`, target: `${callee.dnsName}:${mesh.ports.mtls}` },
    ]),
  );
}

/** The TCP servers `key` is a client of. */
export function tcpServersOf(mesh: Mesh, key: string): MeshTcpServer[] {
  return mesh.tcp.filter((server) => server.clients.includes(key));
}

export function tcpServer(mesh: Mesh, key: string): MeshTcpServer {
  const found = mesh.tcp.find((s) => s.key === key);
  if (!found)
    throw new ConfigError(`${mesh.file}: no tcp server "${key}" (tcp: ${mesh.tcp.map((s) => s.key).join(", ")})`);
  return found;
}

/** The sidecar of a TCP server on this machine: only its tcp.inbound (and admin), on the server's own address. */
export function localTcpSidecarInput(mesh: Mesh, key: string, pkiDir: string): ConfigInput {
  const server = tcpServer(mesh, key);
  return {
    service: { name: server.serviceName, dnsName: server.dnsName },
    tls: {
      cert: join(pkiDir, server.dnsName, "server.crt"),
      key: join(pkiDir, server.dnsName, "server.key"),
      ca: join(pkiDir, "trust", "ca.crt"),
      crl: join(pkiDir, "trust", "ca.crl"),
    },
    inbound: { enabled: false },
    outbound: { enabled: false },
    admin: { listen: `${server.local}:${mesh.ports.admin}` },
    tcp: {
      inbound: [
        {
          name: server.key,
          listen: `${server.local}:${server.mtlsPort}`,
          target: `${server.local}:${server.port}`,
          allow: server.clients.map((c) => service(mesh, c).dnsName),
        },
      ],
    },
  };
}

/**
 * The environment of one sidecar container (podman-compose, systemd EnvironmentFile): the seed's
 * variables only, which is how a service moves onto the mesh without a code change.
 */
export function containerSidecarEnv(mesh: Mesh, key: string): Record<string, string> {
  const s = service(mesh, key);
  return {
    SERVICE_NAME: s.serviceName,
    SERVICE_DNS_NAME: s.dnsName,
    MTLS_ENABLED: "true",
    MTLS_PORT: String(mesh.ports.mtls),
    MTLS_CERT_FILE: "/etc/mtls/identity/server.crt",
    MTLS_KEY_FILE: "/etc/mtls/identity/server.key",
    MTLS_CA_FILE: "/etc/mtls/trust/ca.crt",
    MTLS_CRL_FILE: "/etc/mtls/trust/ca.crl",
    MTLS_VERIFY_CLIENT: "true",
    MTLS_MIN_TLS_VERSION: "TLSv1.3",
    MTLS_ALLOW: s.callers.map((c) => service(mesh, c).dnsName).join(","),
    APP_URL: `http://127.0.0.1:${s.appPort}`,
    // Only where it differs from the default, so that a plain HTTP service's environment is the seed's.
    ...(s.appProtocol === "h2c" ? { APP_PROTOCOL: "h2c" } : {}),
    OUTBOUND_LISTEN: `127.0.0.1:${mesh.ports.outbound}`,
    OUTBOUND_DESTINATIONS: [...new Set(s.calls.map((c) => service(mesh, c.to).dnsName))].join(","),
    ...upstreamsEnv(mesh, key),
    ...tcpOutboundEnv(mesh, key),
    ADMIN_LISTEN: `0.0.0.0:${mesh.ports.admin}`,
    LOG_LEVEL: "info",
  };
}

/** OUTBOUND_UPSTREAMS of a gRPC caller: each callee on the app's loopback, to its sidecar by DNS name. */
function upstreamsEnv(mesh: Mesh, key: string): Record<string, string> {
  const upstreams = grpcUpstreams(mesh, key, "127.0.0.1");
  return Object.keys(upstreams).length ? { OUTBOUND_UPSTREAMS: JSON.stringify(upstreams) } : {};
}

/** TCP_OUTBOUND of a client of TCP servers: each on the app's loopback at the server's port, to its sidecar by DNS name. */
function tcpOutboundEnv(mesh: Mesh, key: string): Record<string, string> {
  const servers = tcpServersOf(mesh, key);
  if (servers.length === 0) return {};
  return {
    TCP_OUTBOUND: JSON.stringify(
      servers.map((server) => ({
        name: server.key,
        listen: `127.0.0.1:${server.port}`,
        target: `${server.dnsName}:${server.mtlsPort}`,
        identity: server.dnsName,
      })),
    ),
  };
}

/** The environment of a TCP server's sidecar container: no HTTP listener, one tcp.inbound in front of the server. */
export function containerTcpSidecarEnv(mesh: Mesh, key: string): Record<string, string> {
  const server = tcpServer(mesh, key);
  return {
    SERVICE_NAME: server.serviceName,
    SERVICE_DNS_NAME: server.dnsName,
    MTLS_ENABLED: "false",
    MTLS_CERT_FILE: "/etc/mtls/identity/server.crt",
    MTLS_KEY_FILE: "/etc/mtls/identity/server.key",
    MTLS_CA_FILE: "/etc/mtls/trust/ca.crt",
    MTLS_CRL_FILE: "/etc/mtls/trust/ca.crl",
    MTLS_MIN_TLS_VERSION: "TLSv1.3",
    OUTBOUND_ENABLED: "false",
    TCP_INBOUND: JSON.stringify([
      {
        name: server.key,
        listen: `0.0.0.0:${server.mtlsPort}`,
        target: `127.0.0.1:${server.port}`,
        allow: server.clients.map((c) => service(mesh, c).dnsName),
      },
    ]),
    ADMIN_LISTEN: `0.0.0.0:${mesh.ports.admin}`,
    LOG_LEVEL: "info",
  };
}
