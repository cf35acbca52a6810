// What the bench compares, one typed record per contender: the direct path to the app, the ashmesh
// sidecar pair (one worker each, and with `workers: "auto"`), the nginx and HAProxy reference
// pairs, and a bare node:tls server as the floor of the new-connection row. Each says which
// measured paths go through it, which inbound new connections are opened against, which protocol
// rows (HTTP/2, gRPC, TCP) it takes part in, and how its processes start and where they listen;
// stack.ts decides which contenders a run needs and starts them, measure.ts and protocols.ts only
// see the result. Every process is started through Procs, so the stack's teardown stops it
// whatever happened.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { DevCa } from "../certs-dev/store.js";
import * as haproxy from "./haproxy.js";
import type { Target } from "./load.js";
import * as nginx from "./nginx.js";
import type { PairPlan } from "./pair.js";
import { type Cores, freePort, type Proc, type Procs, waitForLine, waitForPort } from "./procs.js";
import type { HandshakeSide, PathId, Protocol } from "./report.js";
import {
  CALLEE,
  CALLER,
  calleeConfig,
  callerConfig,
  cleanEnv,
  GRPC_CALLEE,
  grpcCalleeConfig,
  identity,
  listener,
  outboundListener,
  type SidecarConfig,
} from "./sidecars.js";

const ASHMESH = fileURLToPath(new URL("../bin/ashmesh.js", import.meta.url));
const TLS_FLOOR = fileURLToPath(new URL("tls-floor.js", import.meta.url));

export { CALLEE, CALLER, GRPC_CALLEE } from "./sidecars.js";
/** The names of the one-worker pair's two sidecars, as their memory rows carry them (the RSS target reads them). */
export const ASHMESH_SIDECARS = ["ashmesh outbound (gateway)", "ashmesh inbound (auth)"] as const;
/** The app and the proxies share a core; the load generators get the other, so they never compete. */
export const PROXY_CORE = 0;
export const LOAD_CORE = 1;

export const ALL_PROTOCOLS: Protocol[] = ["h2", "grpc", "tcp"];

export interface PathSetup {
  id: PathId;
  target: Target;
  /** The proxy processes whose CPU this path costs (none for direct). */
  proxyPids: () => number[];
}

/** A contender's way into a protocol row: a port on 127.0.0.1 that speaks the row's protocol in. */
export interface ProtocolPath {
  id: PathId;
  protocol: Protocol;
  port: number;
  proxyPids: () => number[];
  /** What the two proxies speak between them, as the row shows it ("—" for direct). */
  between: string;
}

export interface ProcessGroup {
  name: string;
  pids: () => number[];
}

/** A sidecar and its admin listener: the soak reads its heap from /metrics and its GC from its log. */
export interface Sidecar {
  name: string;
  proc: Proc;
  adminPort: number;
}

/** What a contender gives the measurements once its processes listen. */
export interface Running {
  paths: PathSetup[];
  /** Where new mTLS connections are opened for the handshake row, and the processes that pay for them. */
  inbound?: { port: number; pids: () => number[] };
  /** Its processes, one memory row each, in the report's order. */
  memory: ProcessGroup[];
  protocols?: ProtocolPath[];
  /** The protocol rows it cannot take part in, and why (printed in the row). */
  cannot?: Partial<Record<Protocol, string>>;
  sidecars?: Sidecar[];
}

/** Where the stack's apps listen: the protocol apps are null when their rows are not run. */
export interface Apps {
  http: number;
  /** The same app's cleartext HTTP/2 (prior knowledge) port. */
  h2c: number;
  grpc: number | null;
  redis: number | null;
}

export interface StartContext {
  procs: Procs;
  /** The run's temporary directory: configs and logs go there. */
  tmp: string;
  ca: DevCa;
  apps: Apps;
  /** The protocol rows this contender takes part in: those the run measures, if its paths are measured. */
  protocols: Protocol[];
  options: { cpuProf: string | null; sidecarNodeArgs: string[]; peerProtocol: "match" | "h2" };
}

export type ContenderId = "direct" | "ashmesh" | "ashmesh-auto" | "nginx" | "haproxy" | "tls-floor";

export interface Contender {
  id: ContenderId;
  /** For the progress line "starting … (core 0)"; null when it has no process of its own. */
  starting: string | null;
  /** The measured paths that go through it, in the order they alternate. */
  paths: PathId[];
  /** Its inbound for the new-connection row, if it has one: then a handshake run needs it started. */
  inbound: HandshakeSide | null;
  /** Something it needs that may be missing: then the contender is skipped and the report says why. */
  needs?: { find: () => string | null; missingNote: string; skipping: string };
  /** `program`: what `needs.find` found. Resolves once everything it started listens. */
  start(s: StartContext, program: string | null): Promise<Running>;
}

/** How a sidecar is started: `file` and `profile` name what it leaves in the temporary directory and under --cpu-prof. */
interface SidecarStart {
  name: string;
  file: string;
  profile: string;
  config: SidecarConfig;
  cores?: Cores;
}

export function startSidecar(s: StartContext, o: SidecarStart): Proc {
  const configFile = join(s.tmp, `${o.file}.json`);
  writeFileSync(configFile, JSON.stringify(o.config, null, 2));
  const { cpuProf, sidecarNodeArgs } = s.options;
  const nodeArgs = [
    ...sidecarNodeArgs,
    ...(cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${cpuProf}`, `--cpu-prof-name=${o.profile}.cpuprofile`] : []),
  ];
  return s.procs.start(o.name, process.execPath, [...nodeArgs, ASHMESH, "proxy", "--config", configFile], {
    core: o.cores ?? PROXY_CORE,
    logFile: join(s.tmp, `${o.file}.log`),
    env: cleanEnv(),
  });
}

/**
 * The callee's sidecar as the pair runs it, with its admin listener on `adminPort`, for the
 * start-up timing (startup.ts): started fresh each time, with no extra Node options.
 */
export function startCalleeForTiming(s: StartContext, adminPort: number, n: number): Proc {
  return startSidecar(
    { ...s, options: { cpuProf: null, sidecarNodeArgs: [], peerProtocol: s.options.peerProtocol } },
    {
      name: `ashmesh inbound, start-up ${n}`,
      file: `ashmesh-startup-${n}`,
      profile: "",
      config: calleeConfig(s.ca, s.apps, 1, false, adminPort),
    },
  );
}

/** Admin comes last: the sidecar opens it once everything else listens, so its line means ready. */
async function adminPort(proc: Proc): Promise<number> {
  return waitForLine(proc, listener("admin"));
}

/** A process and, under Node's cluster (workers > 1), the workers it forked: adopted, so that they are stopped too. */
function withDescendants(procs: Procs, proc: Proc): () => number[] {
  return () => [proc.pid, ...procs.adoptDescendants(proc.pid)];
}

const ASHMESH_BETWEEN: Record<Protocol, string> = {
  h2: "HTTP/2 over mTLS",
  grpc: "HTTP/2 over mTLS",
  tcp: "TLS 1.3 (tcp.outbound → tcp.inbound)",
};

/**
 * The pair: the callee's sidecars first (the caller's config needs their inbound ports). One
 * worker each on the proxies' core; with `workers: "auto"`, on both cores, where Node's cluster
 * starts a worker per core (and the pair carries HTTP only). The protocol rows add a gRPC
 * service's sidecar and a TCP hop to Redis on the same two sidecars, as a mesh would.
 */
async function startAshmesh(s: StartContext, auto: boolean): Promise<Running> {
  const suffix = auto ? " (workers: auto)" : "";
  const tag = auto ? "-auto" : "";
  const workers = auto ? "auto" : 1;
  const cores: Cores = auto ? [PROXY_CORE, LOAD_CORE] : PROXY_CORE;
  const grpcPort = !auto && s.protocols.includes("grpc") ? s.apps.grpc : null;
  const withTcp = !auto && s.protocols.includes("tcp") && s.apps.redis !== null;

  let search: Proc | null = null;
  let searchPort: number | null = null;
  if (grpcPort !== null) {
    search = startSidecar(s, {
      name: "ashmesh inbound (search, gRPC)",
      file: "ashmesh-search",
      profile: "ashmesh-search-inbound",
      config: grpcCalleeConfig(s.ca, grpcPort),
    });
    searchPort = await waitForLine(search, listener("inbound"));
    await adminPort(search);
  }

  const [callerBase, calleeBase] = ASHMESH_SIDECARS;
  const calleeName = `${calleeBase}${suffix}`;
  const callee = startSidecar(s, {
    name: calleeName,
    file: `ashmesh-auth${tag}`,
    profile: `ashmesh-auth${tag}-inbound`,
    config: calleeConfig(s.ca, s.apps, workers, withTcp),
    cores,
  });
  const inboundPort = await waitForLine(callee, listener("inbound"));
  const tcpInPort = withTcp ? await waitForLine(callee, listener("redis")) : null;
  const calleeAdmin = await adminPort(callee);

  const callerName = `${callerBase}${suffix}`;
  const caller = startSidecar(s, {
    name: callerName,
    file: `ashmesh-gateway${tag}`,
    profile: `ashmesh-gateway${tag}-outbound`,
    config: callerConfig(
      s.ca,
      { http: inboundPort, grpc: searchPort, tcp: tcpInPort },
      workers,
      s.options.peerProtocol,
    ),
    cores,
  });
  const forwardPort = await waitForLine(caller, outboundListener("forward proxy"));
  const mappedPort = await waitForLine(caller, outboundListener("upstream auth"));
  const grpcMapped = search ? await waitForLine(caller, outboundListener("upstream search")) : null;
  const tcpOutPort = withTcp ? await waitForLine(caller, listener("redis")) : null;
  const callerAdmin = await adminPort(caller);

  const callerPids = withDescendants(s.procs, caller);
  const calleePids = withDescendants(s.procs, callee);
  const pair = () => [...callerPids(), ...calleePids()];
  const mapped: Target = { origin: `http://127.0.0.1:${mappedPort}`, path: "/api/v1/ping", host: "auth" };
  const paths: PathSetup[] = auto
    ? [{ id: "ashmesh-auto", target: mapped, proxyPids: pair }]
    : [
        { id: "ashmesh", target: mapped, proxyPids: pair },
        {
          id: "ashmesh-fwd",
          target: { origin: `http://127.0.0.1:${forwardPort}`, path: `http://${CALLEE}/api/v1/ping`, host: CALLEE },
          proxyPids: pair,
        },
      ];
  const protocols: ProtocolPath[] = [];
  if (!auto) {
    const via = (protocol: Protocol, port: number, pids: () => number[]) =>
      protocols.push({ id: "ashmesh", protocol, port, proxyPids: pids, between: ASHMESH_BETWEEN[protocol] });
    if (s.protocols.includes("h2")) via("h2", mappedPort, pair);
    if (search && grpcMapped !== null) {
      const searchProc = search;
      via("grpc", grpcMapped, () => [...callerPids(), searchProc.pid]);
    }
    if (tcpOutPort !== null) via("tcp", tcpOutPort, pair);
  }
  const memory: ProcessGroup[] = [
    { name: callerName, pids: callerPids },
    { name: calleeName, pids: calleePids },
  ];
  if (search) {
    const searchProc = search;
    memory.push({ name: searchProc.name, pids: () => [searchProc.pid] });
  }
  return {
    paths,
    ...(auto ? {} : { inbound: { port: inboundPort, pids: calleePids } }),
    memory,
    protocols,
    sidecars: [
      { name: callerName, proc: caller, adminPort: callerAdmin },
      { name: calleeName, proc: callee, adminPort: calleeAdmin },
    ],
  };
}

/** A reference pair (nginx.ts, haproxy.ts): its configs, its command line and what it can do. */
interface Reference {
  id: "nginx" | "haproxy";
  /** "nginx" / "HAProxy": the names of its processes and memory rows. */
  label: string;
  outboundConfig(plan: PairPlan): string;
  inboundConfig(plan: PairPlan): string;
  args(tmp: string, conf: string): string[];
  /** What it speaks between the pair in each protocol row. */
  between: Record<Protocol, string>;
  /** The protocol rows it cannot take part in here, and why. */
  cannot(): Partial<Record<Protocol, string>>;
  /** For its memory rows: what "its processes" are. */
  processes: string;
}

const NGINX: Reference = {
  id: "nginx",
  label: "nginx",
  outboundConfig: nginx.outboundConfig,
  inboundConfig: nginx.inboundConfig,
  args: (tmp, conf) => ["-p", tmp, "-c", conf, "-g", "daemon off;"],
  between: { h2: nginx.NGINX_H2_BETWEEN, grpc: nginx.NGINX_GRPC_BETWEEN, tcp: "TLS 1.3 (stream module)" },
  cannot: () =>
    nginx.nginxStreamModule()
      ? {}
      : { tcp: "not measured: nginx's stream module is not installed (Debian: libnginx-mod-stream)" },
  processes: "master + worker",
};

const HAPROXY: Reference = {
  id: "haproxy",
  label: "HAProxy",
  outboundConfig: haproxy.outboundConfig,
  inboundConfig: haproxy.inboundConfig,
  args: (_tmp, conf) => ["-db", "-f", conf],
  between: { h2: "HTTP/2 over mTLS (alpn h2)", grpc: "HTTP/2 over mTLS (alpn h2)", tcp: "TLS 1.3 (mode tcp)" },
  cannot: () => ({}),
  processes: "one thread",
};

/** A reference pair takes its ports from its config, so they are picked before it starts. */
async function startReference(s: StartContext, program: string, ref: Reference): Promise<Running> {
  const { procs, tmp, apps } = s;
  const cannot = ref.cannot();
  const wants = (p: Protocol) => s.protocols.includes(p) && !cannot[p];
  const hop = async (peerName: string, targetPort: number) => ({
    outPort: await freePort(),
    inPort: await freePort(),
    peerName,
    callee: identity(s.ca, peerName),
    targetPort,
  });
  const plan: PairPlan = {
    dir: tmp,
    caller: identity(s.ca, CALLER),
    allow: CALLER,
    connections: 64,
    http: await hop(CALLEE, apps.http),
  };
  if (wants("h2")) plan.h2 = { outPort: await freePort() };
  if (wants("grpc") && apps.grpc !== null) plan.grpc = await hop(GRPC_CALLEE, apps.grpc);
  if (wants("tcp") && apps.redis !== null) plan.tcp = await hop(CALLEE, apps.redis);

  const start = (side: "inbound" | "outbound", config: string) => {
    const conf = join(tmp, `${ref.id}-${side}.conf`);
    writeFileSync(conf, config);
    return procs.start(`${ref.label} ${side}`, program, ref.args(tmp, conf), {
      core: PROXY_CORE,
      logFile: join(tmp, `${ref.id}-${side}.stderr.log`),
    });
  };
  const pIn = start("inbound", ref.inboundConfig(plan));
  const pOut = start("outbound", ref.outboundConfig(plan));
  await waitForPort(plan.http.inPort, pIn);
  await waitForPort(plan.http.outPort, pOut);
  // nginx's workers are adopted so that they are stopped whatever happens (HAProxy has none).
  const inPids = withDescendants(procs, pIn);
  const outPids = withDescendants(procs, pOut);
  inPids();
  outPids();
  const pair = () => [...outPids(), ...inPids()];
  const protocols: ProtocolPath[] = [];
  const via = (protocol: Protocol, port: number) =>
    protocols.push({ id: ref.id, protocol, port, proxyPids: pair, between: ref.between[protocol] });
  if (plan.h2) via("h2", plan.h2.outPort);
  if (plan.grpc) via("grpc", plan.grpc.outPort);
  if (plan.tcp) via("tcp", plan.tcp.outPort);
  return {
    paths: [
      {
        id: ref.id,
        target: { origin: `http://127.0.0.1:${plan.http.outPort}`, path: "/api/v1/ping", host: "auth" },
        proxyPids: pair,
      },
    ],
    inbound: { port: plan.http.inPort, pids: inPids },
    memory: [
      { name: `${ref.label} outbound (${ref.processes})`, pids: outPids },
      { name: `${ref.label} inbound (${ref.processes})`, pids: inPids },
    ],
    protocols,
    cannot,
  };
}

/** The crypto floor of the handshake row (tls-floor.ts), with the callee's certificate. */
async function startTlsFloor(s: StartContext): Promise<Running> {
  const proc = s.procs.start("node:tls floor", process.execPath, [TLS_FLOOR, JSON.stringify(identity(s.ca, CALLEE))], {
    core: PROXY_CORE,
    logFile: join(s.tmp, "tls-floor.log"),
  });
  const port = await waitForLine(proc, (l) =>
    l.startsWith('{"port"') ? (JSON.parse(l) as { port: number }).port : null,
  );
  return { paths: [], inbound: { port, pids: () => [proc.pid] }, memory: [] };
}

/** In the order they start, which is also the order of the paths and of the memory rows. */
export const CONTENDERS: readonly Contender[] = [
  {
    id: "direct",
    starting: null,
    paths: ["direct"],
    inbound: null,
    // The stack's apps themselves: the baseline every overhead is measured against.
    start: async ({ apps, protocols }) => {
      const direct = (protocol: Protocol, port: number | null): ProtocolPath[] =>
        port === null || !protocols.includes(protocol)
          ? []
          : [{ id: "direct", protocol, port, proxyPids: () => [], between: "—" }];
      return {
        paths: [
          {
            id: "direct",
            target: { origin: `http://127.0.0.1:${apps.http}`, path: "/api/v1/ping", host: `127.0.0.1:${apps.http}` },
            proxyPids: () => [],
          },
        ],
        memory: [],
        protocols: [...direct("h2", apps.h2c), ...direct("grpc", apps.grpc), ...direct("tcp", apps.redis)],
      };
    },
  },
  {
    id: "ashmesh",
    starting: "the ashmesh sidecars",
    paths: ["ashmesh", "ashmesh-fwd"],
    inbound: "ashmesh inbound",
    start: (s) => startAshmesh(s, false),
  },
  {
    id: "ashmesh-auto",
    starting: 'the ashmesh sidecars with workers: "auto" (cores 0 and 1)',
    paths: ["ashmesh-auto"],
    inbound: null,
    start: (s) => startAshmesh(s, true),
  },
  {
    id: "nginx",
    starting: "the nginx pair",
    paths: ["nginx"],
    inbound: "nginx inbound",
    needs: {
      find: nginx.findNginx,
      missingNote: "nginx is not installed: the reference pair was skipped (Debian: apt-get install nginx).",
      skipping: "nginx not found: skipping the reference pair",
    },
    start: (s, program) => startReference(s, program as string, NGINX),
  },
  {
    id: "haproxy",
    starting: "the HAProxy pair",
    paths: ["haproxy"],
    inbound: "haproxy inbound",
    needs: {
      find: haproxy.findHaproxy,
      missingNote: "HAProxy is not installed: its reference pair was skipped (Debian: apt-get install haproxy).",
      skipping: "haproxy not found: skipping the HAProxy reference pair",
    },
    start: (s, program) => startReference(s, program as string, HAPROXY),
  },
  {
    id: "tls-floor",
    starting: "a bare node:tls server (the handshake floor)",
    paths: [],
    inbound: "node:tls floor",
    start: startTlsFloor,
  },
];

/** Every measurable path, in the order they alternate. */
export const ALL_PATHS: PathId[] = CONTENDERS.flatMap((c) => c.paths);
