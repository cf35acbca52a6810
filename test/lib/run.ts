// The one way the tests run a command to its end and collect its output: openssl, curl, promtool,
// systemd-analyze and the real `ashmesh` command. Asynchronous on purpose: sidecars run in the
// test process, and spawnSync would freeze them while the command talks to them.
import { spawn } from "node:child_process";
import { resolve } from "node:path";

export const ROOT = resolve(import.meta.dirname, "../..");

export interface Ran {
  /** The exit code; null when the command was killed (after `timeoutMs`, for one). */
  code: number | null;
  out: string;
  err: string;
}

export interface RunOptions {
  /** Written to stdin, which is then closed; without it, stdin is empty (/dev/null). */
  input?: string;
  /** The repository root unless given, so relative paths such as bin/ashmesh.ts work. */
  cwd?: string;
  /** This process's environment unless given. */
  env?: NodeJS.ProcessEnv;
  /** Killed with SIGKILL after this long: 20 s unless given. */
  timeoutMs?: number;
}

/** Runs a command (no shell) to its end; resolves whatever its exit code, rejects only if it cannot start. */
export function run(command: string, args: string[], options: RunOptions = {}): Promise<Ran> {
  return new Promise((resolvePromise, reject) => {
    const child = spawn(command, args, {
      cwd: options.cwd ?? ROOT,
      env: options.env ?? process.env,
      stdio: [options.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), options.timeoutMs ?? 20_000);
    child.stdout?.setEncoding("utf8").on("data", (d: string) => {
      out += d;
    });
    child.stderr?.setEncoding("utf8").on("data", (d: string) => {
      err += d;
    });
    child.on("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.on("close", (code) => {
      clearTimeout(timer);
      resolvePromise({ code, out, err });
    });
    if (options.input !== undefined) {
      // A command that exits before reading all of its input is judged by its exit, not by EPIPE.
      child.stdin?.on("error", () => {});
      child.stdin?.end(options.input);
    }
  });
}

/** `ashmesh ARGS` as a real process: bin/ashmesh.ts through tsx, on the Node that runs the tests. */
export function ashmeshCli(args: string[], options: RunOptions = {}): Promise<Ran> {
  return run(process.execPath, ["--import", "tsx", "bin/ashmesh.ts", ...args], options);
}
