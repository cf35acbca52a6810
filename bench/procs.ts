// The processes of a bench run: started pinned to a core with taskset, their output in files
// (a pipe nobody reads would block them; parsing thousands of log lines would cost the harness
// CPU), waited for until they are ready, measured from /proc, and all stopped at the end
// whatever happened.
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readdirSync, readFileSync } from "node:fs";
import net from "node:net";

export interface Proc {
  name: string;
  pid: number;
  child: ChildProcess;
  /** Where stdout and stderr go. */
  logFile: string;
  exited: Promise<number | null>;
  exitCode: number | null | undefined;
}

export interface LineProc {
  proc: Proc;
  ask(line: string, timeoutMs: number): Promise<string>;
  /** Ends its stdin: a well-behaved line process exits. */
  close(): void;
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Wall time from spawn to exit, in seconds. */
  seconds: number;
}

const TASKSET = ["/usr/bin/taskset", "/bin/taskset"].find((p) => existsSync(p)) ?? null;

export function hasTaskset(): boolean {
  return TASKSET !== null;
}

/** One core, a set of cores (a contender that spreads over several), or null: not pinned. */
export type Cores = number | readonly number[] | null;

/** The command line, prefixed with `taskset -c CORES` when taskset exists (it execs in place: same pid). */
function pinned(core: Cores, cmd: string, args: string[]): [string, string[]] {
  if (core === null || !TASKSET) return [cmd, args];
  return [TASKSET, ["-c", typeof core === "number" ? String(core) : core.join(","), cmd, ...args]];
}

export class Procs {
  private readonly procs: Proc[] = [];
  private readonly running = new Set<ChildProcess>();
  /** Processes started by ours (nginx workers): stopped too if their parent did not take them along. */
  private readonly descendants = new Set<number>();

  /** A long-running process; stdout and stderr appended to logFile. */
  start(
    name: string,
    cmd: string,
    args: string[],
    options: { core: Cores; logFile: string; env?: NodeJS.ProcessEnv },
  ): Proc {
    const [file, argv] = pinned(options.core, cmd, args);
    const fd = openSync(options.logFile, "a");
    const child = spawn(file, argv, { stdio: ["ignore", fd, fd], env: options.env ?? process.env });
    closeSync(fd);
    if (child.pid === undefined) throw new Error(`could not start ${name} (${cmd})`);
    const proc: Proc = {
      name,
      pid: child.pid,
      child,
      logFile: options.logFile,
      exitCode: undefined,
      exited: new Promise((resolve) => {
        child.on("exit", (code, signal) => {
          proc.exitCode = code ?? (signal ? -1 : null);
          resolve(code);
        });
        child.on("error", () => {
          proc.exitCode = -1;
          resolve(-1);
        });
      }),
    };
    this.procs.push(proc);
    return proc;
  }

  /**
   * A long-running process spoken to in lines: each ask() writes one line to its stdin and
   * resolves with the next JSON-object line of its stdout (or rejects after timeoutMs, or when
   * it exits).
   */
  startLines(name: string, cmd: string, args: string[], options: { core: Cores }): LineProc {
    const [file, argv] = pinned(options.core, cmd, args);
    const child = spawn(file, argv, { stdio: ["pipe", "pipe", "pipe"] });
    if (child.pid === undefined) throw new Error(`could not start ${name} (${cmd})`);
    let stderr = "";
    let buffer = "";
    const waiting: Array<(line: string | null) => void> = [];
    child.stderr?.on("data", (d: Buffer) => {
      stderr = (stderr + d.toString("utf8")).slice(-4000);
    });
    child.stdout?.on("data", (d: Buffer) => {
      buffer += d.toString("utf8");
      let nl = buffer.indexOf("\n");
      while (nl !== -1) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        nl = buffer.indexOf("\n");
        // Only JSON objects are answers: anything else (NODE_OPTIONS=--trace-gc, warnings) is not.
        if (line.startsWith("{")) waiting.shift()?.(line);
      }
    });
    const proc: Proc = {
      name,
      pid: child.pid,
      child,
      logFile: "",
      exitCode: undefined,
      exited: new Promise((resolve) => {
        child.on("exit", (code, signal) => {
          proc.exitCode = code ?? (signal ? -1 : null);
          for (const w of waiting.splice(0)) w(null);
          resolve(code);
        });
      }),
    };
    this.procs.push(proc);
    return {
      proc,
      ask: (line, timeoutMs) =>
        new Promise((resolve, reject) => {
          if (proc.exitCode !== undefined) return reject(new Error(`${name} has exited:\n${stderr}`));
          const timer = setTimeout(() => {
            const i = waiting.indexOf(answer);
            if (i !== -1) waiting.splice(i, 1);
            reject(new Error(`${name} gave no answer in ${timeoutMs} ms:\n${stderr}`));
          }, timeoutMs);
          const answer = (got: string | null) => {
            clearTimeout(timer);
            if (got === null) reject(new Error(`${name} exited (code ${proc.exitCode}):\n${stderr}`));
            else resolve(got);
          };
          waiting.push(answer);
          child.stdin?.write(`${line}\n`);
        }),
      close: () => child.stdin?.end(),
    };
  }

  /** A command run to completion (bounded by timeoutMs), its output captured. */
  run(cmd: string, args: string[], options: { core: Cores; timeoutMs: number }): Promise<RunResult> {
    const [file, argv] = pinned(options.core, cmd, args);
    const started = performance.now();
    return new Promise((resolve) => {
      const child = spawn(file, argv, { stdio: ["ignore", "pipe", "pipe"] });
      this.running.add(child);
      let stdout = "";
      let stderr = "";
      child.stdout?.on("data", (d: Buffer) => {
        if (stdout.length < 4_000_000) stdout += d.toString("utf8");
      });
      child.stderr?.on("data", (d: Buffer) => {
        if (stderr.length < 1_000_000) stderr += d.toString("utf8");
      });
      const timer = setTimeout(() => child.kill("SIGKILL"), options.timeoutMs);
      const finish = (code: number | null) => {
        clearTimeout(timer);
        this.running.delete(child);
        resolve({ code, stdout, stderr, seconds: (performance.now() - started) / 1000 });
      };
      child.on("close", (code) => finish(code));
      child.on("error", (err) => {
        stderr += String(err);
        finish(-1);
      });
    });
  }

  /** The first long-running process that has exited although nobody stopped it, if any. */
  exitedEarly(): Proc | undefined {
    return this.procs.find((p) => p.exitCode !== undefined);
  }

  /**
   * Stops one process before the end of the run (the start-up timing starts and stops sidecars
   * in turn): SIGTERM, SIGKILL after graceMs. It is then forgotten, so that its exit is not
   * mistaken for a crash by exitedEarly().
   */
  async stop(proc: Proc, graceMs = 3_000): Promise<void> {
    if (proc.exitCode === undefined) {
      proc.child.kill("SIGTERM");
      const timer = setTimeout(() => proc.child.kill("SIGKILL"), graceMs);
      await proc.exited;
      clearTimeout(timer);
    }
    const i = this.procs.indexOf(proc);
    if (i !== -1) this.procs.splice(i, 1);
  }

  adoptDescendants(pid: number): number[] {
    const kids = descendantsOf(pid);
    for (const k of kids) this.descendants.add(k);
    return kids;
  }

  /** SIGTERM to everything still running, SIGKILL after graceMs; resolves when all are gone. */
  async stopAll(graceMs = 3_000): Promise<void> {
    for (const child of this.running) child.kill("SIGKILL");
    const live = this.procs.filter((p) => p.exitCode === undefined);
    for (const p of live) p.child.kill("SIGTERM");
    const all = Promise.all(live.map((p) => p.exited));
    const timedOut = await Promise.race([
      all.then(() => false),
      new Promise<boolean>((resolve) => setTimeout(() => resolve(true), graceMs).unref()),
    ]);
    if (timedOut) {
      for (const p of live) if (p.exitCode === undefined) p.child.kill("SIGKILL");
      await Promise.race([all, new Promise((resolve) => setTimeout(resolve, 1_000).unref())]);
    }
    for (const pid of this.descendants) {
      if (isAlive(pid)) {
        try {
          process.kill(pid, "SIGKILL");
        } catch {
          // already gone
        }
      }
    }
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

function statFields(pid: number): string[] | null {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name may hold spaces and parentheses: the fields start after the last ")".
    return text
      .slice(text.lastIndexOf(")") + 2)
      .trim()
      .split(" ");
  } catch {
    return null;
  }
}

/** Every live descendant of pid (children, grandchildren, ...). */
export function descendantsOf(pid: number): number[] {
  const parents = new Map<number, number>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const fields = statFields(Number(entry));
    if (fields) parents.set(Number(entry), Number(fields[1]));
  }
  const out: number[] = [];
  const queue = [pid];
  while (queue.length > 0 && out.length < 1_000) {
    const p = queue.shift() as number;
    for (const [child, parent] of parents) {
      if (parent === p) {
        out.push(child);
        queue.push(child);
      }
    }
  }
  return out;
}

let clockTicks = 100;
try {
  clockTicks = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;
} catch {
  // 100 on every Linux this runs on
}

/** User + system CPU seconds of the processes (those that have exited count 0). */
export function cpuSeconds(pids: readonly number[]): number {
  let ticks = 0;
  for (const pid of pids) {
    const f = statFields(pid);
    if (f) ticks += Number(f[11]) + Number(f[12]);
  }
  return ticks / clockTicks;
}

export interface Memory {
  /** Resident set size now, MiB. */
  rss: number;
  /** Peak resident set size (VmHWM), MiB. */
  peak: number;
}

export function memory(pids: readonly number[]): Memory {
  let rss = 0;
  let peak = 0;
  for (const pid of pids) {
    try {
      const status = readFileSync(`/proc/${pid}/status`, "utf8");
      rss += Number(/^VmRSS:\s+(\d+)/m.exec(status)?.[1] ?? 0);
      peak += Number(/^VmHWM:\s+(\d+)/m.exec(status)?.[1] ?? 0);
    } catch {
      // exited
    }
  }
  return { rss: rss / 1024, peak: peak / 1024 };
}

/** The last `lines` lines of a log file, for error messages. */
export function tail(file: string, lines = 20): string {
  try {
    return readFileSync(file, "utf8").trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "";
  }
}

/** Polls `file` until a line satisfies `match` (its result is returned), the process exits, or ms pass. */
export async function waitForLine<T>(proc: Proc, match: (line: string) => T | null, ms = 15_000): Promise<T> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    let text = "";
    try {
      text = readFileSync(proc.logFile, "utf8");
    } catch {
      // not written yet
    }
    for (const line of text.split("\n")) {
      const found = match(line);
      if (found !== null) return found;
    }
    if (proc.exitCode !== undefined) {
      throw new Error(`${proc.name} exited (code ${proc.exitCode}) before it was ready:\n${tail(proc.logFile)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  throw new Error(`${proc.name} was not ready after ${ms} ms:\n${tail(proc.logFile)}`);
}

/** A port that was free a moment ago (nginx needs numbers in its config; ashmesh takes port 0). */
export function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolvePort(port));
    });
  });
}

export async function waitForPort(port: number, proc: Proc, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    if (proc.exitCode !== undefined)
      throw new Error(`${proc.name} exited (code ${proc.exitCode}):\n${tail(proc.logFile)}`);
    const ok = await new Promise<boolean>((done) => {
      const s = net.connect(port, "127.0.0.1");
      s.once("connect", () => {
        s.destroy();
        done(true);
      });
      s.once("error", () => done(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`${proc.name}: nothing listens on 127.0.0.1:${port} after ${ms} ms:\n${tail(proc.logFile)}`);
}

export interface CoreTimes {
  busy: number;
  total: number;
}

/** Busy and total time per CPU from /proc/stat, in seconds. */
export function coreTimes(): CoreTimes[] {
  const out: CoreTimes[] = [];
  try {
    for (const line of readFileSync("/proc/stat", "utf8").split("\n")) {
      const m = /^cpu(\d+)\s+(.*)$/.exec(line);
      if (!m) continue;
      const v = (m[2] as string).split(/\s+/).map(Number);
      const total = v.slice(0, 8).reduce((a, b) => a + b, 0);
      const idle = (v[3] ?? 0) + (v[4] ?? 0);
      out[Number(m[1])] = { busy: (total - idle) / clockTicks, total: total / clockTicks };
    }
  } catch {
    // not Linux
  }
  return out;
}

/** Share of each core that was busy between two coreTimes() samples (0..1). */
export function coreBusy(before: CoreTimes[], after: CoreTimes[]): number[] {
  return after.map((a, i) => {
    const b = before[i];
    if (!b) return 0;
    const total = a.total - b.total;
    return total > 0 ? (a.busy - b.busy) / total : 0;
  });
}
