// The stack a run measures: a throw-away CA with the caller's and the callee's identities, the
// app, and the contenders the options call for, started in the order contenders.ts lists them;
// then its teardown, exactly once, whether the run ends, fails or is interrupted. Everything lives
// in one temporary directory, so that a run leaves nothing behind unless asked to (--keep).
import { mkdtempSync, rmSync } from "node:fs";
import os from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Client } from "undici";
import { DevCa } from "../certs-dev/store.js";
import {
  CALLEE,
  CALLER,
  CONTENDERS,
  type Contender,
  type ContenderId,
  type PathSetup,
  PROXY_CORE,
  type ProcessGroup,
  type StartContext,
} from "./contenders.js";
import { type Proc, Procs, waitForLine } from "./procs.js";
import { type HandshakeRun, PATH_LABELS, type PathId } from "./report.js";

const APP = fileURLToPath(new URL("app.js", import.meta.url));

export interface StackOptions {
  paths: PathId[];
  handshakeS: number;
  /** Contenders left out on request (--no-nginx), as opposed to not needed. */
  skip: ContenderId[];
  cpuProf: string | null;
  sidecarNodeArgs: string[];
}

export interface Inbound {
  side: HandshakeRun["side"];
  port: number;
  pids: () => number[];
}

export interface Stack {
  app: Proc;
  ca: DevCa;
  /** Every path of the contenders started, including those the options do not measure. */
  paths: Map<PathId, PathSetup>;
  inbounds: Inbound[];
  memoryOf: ProcessGroup[];
  started: Set<ContenderId>;
}

export interface Workspace {
  procs: Procs;
  tmp: string;
  /** After Ctrl-C the run fails because its processes were stopped: that is not news. */
  interrupted(): boolean;
  teardown(): Promise<void>;
}

/** The run's processes and temporary directory; SIGINT and SIGTERM tear them down too. */
export function workspace(keep: boolean, progress: (message: string) => void): Workspace {
  const procs = new Procs();
  const tmp = mkdtempSync(join(os.tmpdir(), "ashmesh-bench-"));
  let cleaned = false;
  let interrupted = false;
  const teardown = async () => {
    if (cleaned) return;
    cleaned = true;
    await procs.stopAll();
    if (keep) progress(`kept ${tmp}`);
    else rmSync(tmp, { recursive: true, force: true });
  };
  const onSignal = (signal: NodeJS.Signals) => {
    interrupted = true;
    progress(`${signal}: stopping everything the bench started`);
    void teardown().finally(() => process.exit(signal === "SIGINT" ? 130 : 143));
  };
  process.once("SIGINT", onSignal);
  process.once("SIGTERM", onSignal);
  return { procs, tmp, interrupted: () => interrupted, teardown };
}

/** A contender runs when one of its paths is measured, or its inbound is, for the handshake row. */
function wanted(c: Contender, o: StackOptions): boolean {
  return c.paths.some((p) => o.paths.includes(p)) || (c.inbound !== null && o.handshakeS > 0);
}

export async function startStack(
  { procs, tmp }: Workspace,
  o: StackOptions,
  notes: string[],
  progress: (message: string) => void,
): Promise<Stack> {
  progress(`temporary CA and certificates for ${CALLER} and ${CALLEE} in ${tmp}`);
  const ca = await DevCa.init(join(tmp, "pki"));
  await ca.issue(CALLER);
  await ca.issue(CALLEE);

  progress(`starting the app (core ${PROXY_CORE})`);
  const app = procs.start("app", process.execPath, [APP, "0"], { core: PROXY_CORE, logFile: join(tmp, "app.log") });
  const appPort = await waitForLine(app, (l) =>
    l.startsWith('{"port"') ? (JSON.parse(l) as { port: number }).port : null,
  );
  const stack: Stack = {
    app,
    ca,
    paths: new Map(),
    inbounds: [],
    memoryOf: [{ name: "app (node:http)", pids: () => [app.pid] }],
    started: new Set(),
  };
  const context: StartContext = { procs, tmp, ca, appPort, options: o };
  for (const c of CONTENDERS) {
    if (o.skip.includes(c.id)) continue;
    const program = c.needs ? c.needs.find() : null;
    if (c.needs && !program) {
      notes.push(c.needs.missingNote);
      progress(c.needs.skipping);
      continue;
    }
    if (!wanted(c, o)) continue;
    if (c.starting) progress(`starting ${c.starting} (core ${PROXY_CORE})`);
    const running = await c.start(context, program);
    for (const p of running.paths) stack.paths.set(p.id, p);
    if (c.inbound && running.inbound) stack.inbounds.push({ side: c.inbound, ...running.inbound });
    stack.memoryOf.push(...running.memory);
    stack.started.add(c.id);
  }
  return stack;
}

/** One request per path before any load: the answer must come from the app, through mTLS for the pairs. */
export async function checkPaths(stack: Stack): Promise<void> {
  for (const setup of stack.paths.values()) {
    const t = setup.target;
    const client = new Client(t.origin);
    try {
      const path = t.path.replace("/api/v1/ping", "/echo");
      const res = await client.request({
        method: "GET",
        path,
        headers: { host: t.host },
        headersTimeout: 5_000,
        bodyTimeout: 5_000,
      });
      const body = await res.body.text();
      if (res.statusCode !== 200) {
        throw new Error(`${PATH_LABELS[setup.id]}: GET ${path} answered ${res.statusCode}: ${body.slice(0, 300)}`);
      }
      const xfcc = (JSON.parse(body) as { xfcc: string | null }).xfcc;
      if (setup.id !== "direct" && !xfcc?.includes(CALLER)) {
        throw new Error(
          `${PATH_LABELS[setup.id]}: the app saw x-forwarded-client-cert ${JSON.stringify(xfcc)}, not ${CALLER}`,
        );
      }
    } finally {
      await client.close();
    }
  }
}
