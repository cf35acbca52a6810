// Runs the real `ashmesh` command (bin/ashmesh.ts through tsx, on the Node that runs the tests)
// and reads its JSON log lines as they come.
import { type ChildProcess, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { stringify } from "yaml";

export interface Running {
  child: ChildProcess;
  lines: Array<Record<string, unknown>>;
  stderr: string;
  exited: Promise<number | null>;
  /** Resolves with the first log line matching `predicate` (rejects after `ms`). */
  waitFor(predicate: (line: Record<string, unknown>) => boolean, ms?: number): Promise<Record<string, unknown>>;
}

export interface SpawnOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** A command that runs it, e.g. ["ip", "netns", "exec", "ns1"]. */
  prefix?: string[];
  /** Another TypeScript entry point than bin/ashmesh.ts (compose/standin.ts). */
  script?: string;
}

export function ashmesh(args: string[], options: SpawnOptions = {}): Running {
  const command = [
    ...(options.prefix ?? []),
    process.execPath,
    "--import",
    "tsx",
    options.script ?? "bin/ashmesh.ts",
    ...args,
  ];
  const child = spawn(command[0] as string, command.slice(1), {
    env: { ...process.env, ...options.env },
    cwd: options.cwd ?? process.cwd(),
    stdio: ["ignore", "pipe", "pipe"],
  });
  const lines: Array<Record<string, unknown>> = [];
  const waiters: Array<{
    predicate: (l: Record<string, unknown>) => boolean;
    resolve: (l: Record<string, unknown>) => void;
  }> = [];
  let buffer = "";
  let stderr = "";
  child.stdout?.on("data", (d: Buffer) => {
    buffer += d.toString("utf8");
    let nl = buffer.indexOf("\n");
    while (nl !== -1) {
      const text = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      nl = buffer.indexOf("\n");
      let line: Record<string, unknown>;
      try {
        line = JSON.parse(text) as Record<string, unknown>;
      } catch {
        line = { text };
      }
      lines.push(line);
      for (const w of [...waiters]) {
        if (w.predicate(line)) {
          waiters.splice(waiters.indexOf(w), 1);
          w.resolve(line);
        }
      }
    }
  });
  child.stderr?.on("data", (d: Buffer) => {
    stderr += d.toString("utf8");
  });
  const exited = new Promise<number | null>((resolve) => child.on("exit", (code) => resolve(code)));
  return {
    child,
    lines,
    get stderr() {
      return stderr;
    },
    exited,
    waitFor(predicate, ms = 15_000) {
      const found = lines.find(predicate);
      if (found) return Promise.resolve(found);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`no matching log line in ${ms} ms; stderr: ${stderr}`)), ms);
        waiters.push({
          predicate,
          resolve: (l) => {
            clearTimeout(timer);
            resolve(l);
          },
        });
      });
    },
  } as Running;
}

export function writeYaml(path: string, value: unknown): string {
  writeFileSync(path, stringify(value));
  return path;
}

export function portOf(line: Record<string, unknown>): number {
  return Number(String(line.address).split(":").pop());
}
