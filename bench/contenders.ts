// What the bench compares, one typed record per contender: the direct path to the app, the ashmesh
// sidecar pair and the nginx reference pair. Each says which measured paths go through it, which
// inbound new connections are opened against, and how its processes start and where they listen;
// stack.ts decides which contenders a run needs and starts them, measure.ts only sees the result.
// Every process is started through Procs, so the stack's teardown stops it whatever happened.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { DevCa } from "../certs-dev/store.js";
import { ENV_VARS } from "../config/load.js";
import type { ConfigInput } from "../config/schema.js";
import type { Target } from "./load.js";
import { findNginx, inboundConfig, type NginxFiles, outboundConfig } from "./nginx.js";
import { freePort, type Proc, type Procs, waitForLine, waitForPort } from "./procs.js";
import type { HandshakeRun, PathId } from "./report.js";

const ASHMESH = fileURLToPath(new URL("../bin/ashmesh.js", import.meta.url));

export const CALLER = "gateway.ashchan.local";
export const CALLEE = "auth.ashchan.local";
/** The app and the proxies share a core; the load generators get the other, so they never compete. */
export const PROXY_CORE = 0;
export const LOAD_CORE = 1;

export interface PathSetup {
  id: PathId;
  target: Target;
  /** The proxy processes whose CPU this path costs (none for direct). */
  proxyPids: () => number[];
}

export interface ProcessGroup {
  name: string;
  pids: () => number[];
}

/** What a contender gives the measurements once its processes listen. */
export interface Running {
  paths: PathSetup[];
  /** Where new mTLS connections are opened for the handshake row, and the processes that pay for them. */
  inbound?: { port: number; pids: () => number[] };
  /** Its processes, one memory row each, in the report's order. */
  memory: ProcessGroup[];
}

export interface StartContext {
  procs: Procs;
  /** The run's temporary directory: configs and logs go there. */
  tmp: string;
  ca: DevCa;
  appPort: number;
  options: { cpuProf: string | null; sidecarNodeArgs: string[] };
}

export type ContenderId = "direct" | "ashmesh" | "nginx";

export interface Contender {
  id: ContenderId;
  /** For the progress line "starting … (core 0)"; null when it has no process of its own. */
  starting: string | null;
  /** The measured paths that go through it, in the order they alternate. */
  paths: PathId[];
  /** Its inbound for the new-connection row, if it has one: then a handshake run needs it started. */
  inbound: HandshakeRun["side"] | null;
  /** A program it needs that may be missing: then the contender is skipped and the report says why. */
  needs?: { find: () => string | null; missingNote: string; skipping: string };
  /** `program`: what `needs.find` found. Resolves once everything it started listens. */
  start(s: StartContext, program: string | null): Promise<Running>;
}

/** Both pairs use the same files; typed as both so that the `tls` section is checked against the schema too. */
function identity(ca: DevCa, name: string): NonNullable<ConfigInput["tls"]> & NginxFiles {
  const f = ca.identityFiles(name);
  return { cert: f.cert, key: f.key, ca: f.ca, crl: f.crl };
}

/** The environment without the variables that would override a sidecar's config file. */
function cleanEnv(): NodeJS.ProcessEnv {
  const env = { ...process.env };
  for (const name of Object.keys(ENV_VARS)) delete env[name];
  return env;
}

/**
 * A sidecar of the pair as an `ashmesh proxy` config file holds it, typed as the schema's input so
 * that the compiler checks every key. The short drain lets the sidecars exit within the
 * teardown's grace period instead of being killed.
 */
function sidecarConfig(
  ca: DevCa,
  service: ConfigInput["service"],
  sides: Pick<ConfigInput, "inbound" | "outbound">,
): ConfigInput {
  return {
    service,
    tls: identity(ca, service.dnsName),
    inbound: sides.inbound,
    outbound: sides.outbound,
    admin: { listen: "127.0.0.1:0" },
    limits: { drainTimeoutMs: 1_000 },
    log: { level: "info" },
  };
}

/** The callee's sidecar: mTLS in front of the app, the caller alone allowed. */
function calleeConfig(ca: DevCa, appPort: number): ConfigInput {
  return sidecarConfig(
    ca,
    { name: "auth", dnsName: CALLEE },
    {
      inbound: { listen: "127.0.0.1:0", app: `http://127.0.0.1:${appPort}`, allow: [CALLER] },
      outbound: { enabled: false },
    },
  );
}

/** The caller's sidecar: a forward proxy and a port mapped to the callee, found at the callee sidecar's port. */
function callerConfig(ca: DevCa, inboundPort: number): ConfigInput {
  return sidecarConfig(
    ca,
    { name: "gateway", dnsName: CALLER },
    {
      inbound: { enabled: false },
      outbound: {
        listen: "127.0.0.1:0",
        resolve: { [CALLEE]: `127.0.0.1:${inboundPort}` },
        upstreams: { auth: { listen: "127.0.0.1:0", target: `${CALLEE}:8443` } },
      },
    },
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

/** `file` and `profile` name what it leaves in the temporary directory and under --cpu-prof: one per sidecar. */
function startSidecar(s: StartContext, name: string, file: string, profile: string, config: ConfigInput): Proc {
  const configFile = join(s.tmp, `${file}.json`);
  writeFileSync(configFile, JSON.stringify(config, null, 2));
  const { cpuProf, sidecarNodeArgs } = s.options;
  const nodeArgs = [
    ...sidecarNodeArgs,
    ...(cpuProf ? ["--cpu-prof", `--cpu-prof-dir=${cpuProf}`, `--cpu-prof-name=${profile}.cpuprofile`] : []),
  ];
  return s.procs.start(name, process.execPath, [...nodeArgs, ASHMESH, "proxy", "--config", configFile], {
    core: PROXY_CORE,
    logFile: join(s.tmp, `${file}.log`),
    env: cleanEnv(),
  });
}

/**
 * The callee's sidecar first: the caller's config needs its inbound port. Each counts as up once
 * its admin listener's line is logged: the sidecar opens it last, when it is ready.
 */
async function startAshmesh(s: StartContext): Promise<Running> {
  const calleeName = "ashmesh inbound (auth)";
  const callee = startSidecar(s, calleeName, "ashmesh-auth", "ashmesh-auth-inbound", calleeConfig(s.ca, s.appPort));
  const inboundPort = await waitForLine(
    callee,
    listeningPort((l) => l.listener === "inbound"),
  );
  await waitForLine(
    callee,
    listeningPort((l) => l.listener === "admin"),
  );
  const callerName = "ashmesh outbound (gateway)";
  const caller = startSidecar(
    s,
    callerName,
    "ashmesh-gateway",
    "ashmesh-gateway-outbound",
    callerConfig(s.ca, inboundPort),
  );
  const forwardPort = await waitForLine(
    caller,
    listeningPort((l) => l.listener === "outbound" && l.name === "forward proxy"),
  );
  const mappedPort = await waitForLine(
    caller,
    listeningPort((l) => l.listener === "outbound" && l.name === "upstream auth"),
  );
  await waitForLine(
    caller,
    listeningPort((l) => l.listener === "admin"),
  );
  const pair = () => [caller.pid, callee.pid];
  return {
    paths: [
      {
        id: "ashmesh",
        target: { origin: `http://127.0.0.1:${mappedPort}`, path: "/api/v1/ping", host: "auth" },
        proxyPids: pair,
      },
      {
        id: "ashmesh-fwd",
        target: { origin: `http://127.0.0.1:${forwardPort}`, path: `http://${CALLEE}/api/v1/ping`, host: CALLEE },
        proxyPids: pair,
      },
    ],
    inbound: { port: inboundPort, pids: () => [callee.pid] },
    memory: [
      { name: callerName, pids: () => [caller.pid] },
      { name: calleeName, pids: () => [callee.pid] },
    ],
  };
}

/** nginx takes its ports from its config, so they are picked before it starts. */
async function startNginx(s: StartContext, nginx: string): Promise<Running> {
  const { procs, tmp } = s;
  const inPort = await freePort();
  const outPort = await freePort();
  const inConf = join(tmp, "nginx-inbound.conf");
  const outConf = join(tmp, "nginx-outbound.conf");
  writeFileSync(
    inConf,
    inboundConfig(tmp, {
      listen: inPort,
      appPort: s.appPort,
      allow: CALLER,
      files: identity(s.ca, CALLEE),
      connections: 64,
    }),
  );
  writeFileSync(
    outConf,
    outboundConfig(tmp, {
      listen: outPort,
      peerPort: inPort,
      peerName: CALLEE,
      files: identity(s.ca, CALLER),
      connections: 64,
    }),
  );
  const start = (name: string, conf: string, log: string) =>
    procs.start(name, nginx, ["-p", tmp, "-c", conf, "-g", "daemon off;"], {
      core: PROXY_CORE,
      logFile: join(tmp, log),
    });
  const nIn = start("nginx inbound", inConf, "nginx-inbound.stderr.log");
  const nOut = start("nginx outbound", outConf, "nginx-outbound.stderr.log");
  await waitForPort(inPort, nIn);
  await waitForPort(outPort, nOut);
  // Master and its worker: the workers are adopted so that they are stopped whatever happens.
  const inPids = () => [nIn.pid, ...procs.adoptDescendants(nIn.pid)];
  const outPids = () => [nOut.pid, ...procs.adoptDescendants(nOut.pid)];
  inPids();
  outPids();
  return {
    paths: [
      {
        id: "nginx",
        target: { origin: `http://127.0.0.1:${outPort}`, path: "/api/v1/ping", host: "auth" },
        proxyPids: () => [...outPids(), ...inPids()],
      },
    ],
    inbound: { port: inPort, pids: inPids },
    memory: [
      { name: "nginx outbound (master + worker)", pids: outPids },
      { name: "nginx inbound (master + worker)", pids: inPids },
    ],
  };
}

/** In the order they start, which is also the order of the paths and of the memory rows. */
export const CONTENDERS: readonly Contender[] = [
  {
    id: "direct",
    starting: null,
    paths: ["direct"],
    inbound: null,
    // The stack's app itself: the baseline every overhead is measured against.
    start: async (s) => ({
      paths: [
        {
          id: "direct",
          target: { origin: `http://127.0.0.1:${s.appPort}`, path: "/api/v1/ping", host: `127.0.0.1:${s.appPort}` },
          proxyPids: () => [],
        },
      ],
      memory: [],
    }),
  },
  {
    id: "ashmesh",
    starting: "the ashmesh sidecars",
    paths: ["ashmesh", "ashmesh-fwd"],
    inbound: "ashmesh inbound",
    start: startAshmesh,
  },
  {
    id: "nginx",
    starting: "the nginx pair",
    paths: ["nginx"],
    inbound: "nginx inbound",
    needs: {
      find: findNginx,
      missingNote: "nginx is not installed: the reference pair was skipped (Debian: apt-get install nginx).",
      skipping: "nginx not found: skipping the reference pair",
    },
    start: (s, nginx) => startNginx(s, nginx as string),
  },
];

/** Every measurable path, in the order they alternate. */
export const ALL_PATHS: PathId[] = CONTENDERS.flatMap((c) => c.paths);
