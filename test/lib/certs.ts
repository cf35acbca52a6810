// Helpers for the certs-* tests: the real `ashmesh certs` command (spawned asynchronously, so
// sidecars in this process keep serving while it runs), openssl, and in-process calls of
// bin/certs.ts `main` with its output captured.
import { spawn, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { main } from "../../bin/certs.js";
import { exitCodeFor } from "../../bin/cli.js";

export interface Tap {
  teardown(fn: () => unknown): void;
}

export interface Ran {
  code: number | null;
  out: string;
  err: string;
}

/** Runs a command with a 20 s bound (killed after), stdin closed unless `input` is given. */
export function run(cmd: string, args: string[], options: { input?: string; cwd?: string } = {}): Promise<Ran> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ["pipe", "pipe", "pipe"], cwd: options.cwd ?? process.cwd() });
    let out = "";
    let err = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 20_000);
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    child.on("close", (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
    child.stdin.end(options.input);
  });
}

/** `ashmesh certs ARGS` as a real process (bin/ashmesh.ts through tsx). */
export function certsCli(args: string[]): Promise<Ran> {
  return run(process.execPath, ["--import", "tsx", "bin/ashmesh.ts", "certs", ...args]);
}

/** bin/certs.ts `main` in this process, its lines captured and errors mapped to exit codes as the CLI does. */
export async function certs(args: string[]): Promise<Ran> {
  const lines: string[] = [];
  try {
    const code = await main(args, (line) => lines.push(line));
    return { code, out: lines.map((l) => `${l}\n`).join(""), err: "" };
  } catch (err) {
    return { code: exitCodeFor(err), out: lines.map((l) => `${l}\n`).join(""), err: (err as Error).message };
  }
}

export const hasOpenssl = spawnSync("openssl", ["version"]).status === 0;

export function openssl(args: string[], input?: string): Promise<Ran> {
  return run("openssl", args, input === undefined ? {} : { input });
}

export function tempDir(t: Tap, prefix = "ashmesh-certs-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** The PEM blocks of one label in a file's text (`openssl crl` reads only the first of several). */
export function pemBlocks(text: string, label: string): string[] {
  return [...text.matchAll(new RegExp(`-----BEGIN ${label}-----[\\s\\S]+?-----END ${label}-----`, "g"))].map(
    (m) => `${m[0]}\n`,
  );
}
