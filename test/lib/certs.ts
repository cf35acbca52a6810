// Helpers for the certs-* tests: the real `ashmesh certs` command (spawned asynchronously, so
// sidecars in this process keep serving while it runs), openssl, and in-process calls of
// bin/certs.ts `main` with its output captured.
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { exitCodeFor } from "../../bin/args.js";
import { main } from "../../bin/certs.js";
import { ashmeshCli, type Ran, run } from "./run.js";

export interface Tap {
  teardown(fn: () => unknown): void;
}

/** `ashmesh certs ARGS` as a real process. */
export function certsCli(args: string[]): Promise<Ran> {
  return ashmeshCli(["certs", ...args]);
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
  return run("openssl", args, { input });
}

/** openssl ARGS that must succeed: throws with openssl's complaint otherwise. */
export async function opensslOk(args: string[], options: { cwd?: string } = {}): Promise<void> {
  const r = await run("openssl", args, options);
  if (r.code !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.err}`);
}

/** The part of `openssl req` that makes a new, unencrypted ECDSA P-256 key. */
export const NEW_P256_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

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
