// The ashmesh sidecars as the bench configures them: the config file of each (typed as the
// schema's input, so that the compiler checks every key against config/schema.ts), the
// environment they start in, and the "listening" log lines their ports are read from (they listen
// on port 0). contenders.ts starts them; the names here are the mesh's identities.
import type { DevCa } from "../certs-dev/store.js";
import { ENV_VARS } from "../config/load.js";
import type { ConfigInput } from "../config/schema.js";
import type { Apps } from "./contenders.js";
import type { TlsFiles } from "./pair.js";

export const CALLER = "gateway.ashchan.local";
export const CALLEE = "auth.ashchan.local";
/** The gRPC service's identity: a second callee, as a mesh has one sidecar per service. */
export const GRPC_CALLEE = "search.ashchan.local";

/** Every pair uses the same files; typed as both so that the `tls` section is checked against the schema too. */
export function identity(ca: DevCa, name: string): NonNullable<ConfigInput["tls"]> & TlsFiles {
  const f = ca.identityFiles(name);
  return { cert: f.cert, key: f.key, ca: f.ca, crl: f.crl };
}

/** The environment without the variables that would override a sidecar's config file. */
export function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const name of Object.keys(ENV_VARS)) delete env[name];
  return env;
}

export type SidecarConfig = ConfigInput;

/**
 * A sidecar as an `ashmesh proxy` config file holds it, typed as the schema's input so that the
 * compiler checks every key. The short drain lets the sidecars exit within the teardown's grace
 * period instead of being killed. `workers` is always written out, so that
 * the one-worker pair stays one worker whatever the default becomes.
 */
function sidecarConfig(
  ca: DevCa,
  service: ConfigInput["service"],
  sides: Pick<ConfigInput, "inbound" | "outbound" | "tcp">,
  workers: number | "auto",
  adminPort = 0,
): SidecarConfig {
  return {
    service,
    tls: identity(ca, service.dnsName),
    inbound: sides.inbound,
    outbound: sides.outbound,
    ...(sides.tcp ? { tcp: sides.tcp } : {}),
    admin: { listen: `127.0.0.1:${adminPort}` },
    limits: { drainTimeoutMs: 1_000 },
    log: { level: "info" },
    workers,
  };
}

/** The callee's sidecar: mTLS in front of the app, the caller alone allowed; a TCP hop to Redis if asked. */
export function calleeConfig(ca: DevCa, apps: Apps, workers: number | "auto", withTcp: boolean, adminPort = 0) {
  return sidecarConfig(
    ca,
    { name: "auth", dnsName: CALLEE },
    {
      inbound: { listen: "127.0.0.1:0", app: `http://127.0.0.1:${apps.http}`, allow: [CALLER] },
      outbound: { enabled: false },
      ...(withTcp && apps.redis !== null
        ? {
            tcp: {
              inbound: [{ name: "redis", listen: "127.0.0.1:0", target: `127.0.0.1:${apps.redis}`, allow: [CALLER] }],
            },
          }
        : {}),
    },
    workers,
    adminPort,
  );
}

/** The gRPC service's sidecar: mTLS in front of the gRPC app (cleartext HTTP/2 to it). */
export function grpcCalleeConfig(ca: DevCa, grpcPort: number): SidecarConfig {
  return sidecarConfig(
    ca,
    { name: "search", dnsName: GRPC_CALLEE },
    {
      inbound: {
        listen: "127.0.0.1:0",
        app: `http://127.0.0.1:${grpcPort}`,
        appProtocol: "h2c",
        allow: [CALLER],
      },
      outbound: { enabled: false },
    },
    1,
  );
}

/** Where the caller's sidecar finds its peers: the callee's inbound ports. */
export interface Peers {
  http: number;
  grpc: number | null;
  tcp: number | null;
}

/** The caller's sidecar: a forward proxy and ports mapped to the callees, found at their sidecars' ports. */
export function callerConfig(
  ca: DevCa,
  peers: Peers,
  workers: number | "auto",
  peerProtocol: "match" | "h2" = "match",
): SidecarConfig {
  const grpc = peers.grpc;
  return sidecarConfig(
    ca,
    { name: "gateway", dnsName: CALLER },
    {
      inbound: { enabled: false },
      outbound: {
        listen: "127.0.0.1:0",
        peerProtocol,
        resolve: {
          [CALLEE]: `127.0.0.1:${peers.http}`,
          ...(grpc !== null ? { [GRPC_CALLEE]: `127.0.0.1:${grpc}` } : {}),
        },
        upstreams: {
          auth: { listen: "127.0.0.1:0", target: `${CALLEE}:8443` },
          ...(grpc !== null ? { search: { listen: "127.0.0.1:0", target: `${GRPC_CALLEE}:8443` } } : {}),
        },
      },
      ...(peers.tcp !== null
        ? {
            tcp: {
              outbound: [{ name: "redis", listen: "127.0.0.1:0", target: `127.0.0.1:${peers.tcp}`, identity: CALLEE }],
            },
          }
        : {}),
    },
    workers,
  );
}

/** The port of a sidecar's "listening" log line that `match` picks (the sidecars listen on port 0). */
function listeningPort(match: (line: Record<string, unknown>) => boolean) {
  return (text: string): number | null => {
    if (!text.startsWith("{")) return null;
    try {
      const line = JSON.parse(text) as Record<string, unknown>;
      if (line.event !== "listening" || !match(line)) return null;
      return Number(String(line.address).split(":").pop());
    } catch {
      return null;
    }
  };
}

export const listener = (name: string) => listeningPort((l) => l.listener === name);
export const outboundListener = (name: string) => listeningPort((l) => l.listener === "outbound" && l.name === name);
