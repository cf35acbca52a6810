// One writer at a time per CA directory. `certs renew --watch` runs for days beside an operator
// who revokes or rotates by hand; without a lock the two would read index.json, change it and
// write it back, and one change would be lost without a word.
import { closeSync, openSync, readFileSync, rmSync, writeSync } from "node:fs";
import { join } from "node:path";
import { CaError } from "./store.js";

const WAIT_MS = 10_000;
const POLL_MS = 100;

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/** Runs `fn` holding DIR/ca/.lock; waits up to 10 s for another holder; takes over a dead one's lock. */
export async function withLock<T>(dir: string, fn: () => Promise<T>): Promise<T> {
  const path = join(dir, "ca", ".lock");
  const deadline = Date.now() + WAIT_MS;
  let holder = "";
  for (let attempt = 0; attempt < WAIT_MS / POLL_MS + 10; attempt++) {
    let fd: number;
    try {
      fd = openSync(path, "wx", 0o600);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === "ENOENT") return fn(); // no ca/ yet: nothing to protect (init makes it)
      if (code !== "EEXIST") throw err;
      holder = readHolder(path);
      const pid = Number.parseInt(holder, 10);
      // An empty file is a holder between open and write: wait for it like for any other.
      if (holder !== "" && !(Number.isInteger(pid) && alive(pid))) {
        rmSync(path, { force: true }); // left behind by a process that died
        continue;
      }
      if (Date.now() >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, POLL_MS));
      continue;
    }
    try {
      writeSync(fd, `${process.pid}\n`);
      closeSync(fd);
      return await fn();
    } finally {
      rmSync(path, { force: true });
    }
  }
  throw new CaError(
    `${path}: another \`ashmesh certs\` (pid ${holder || "unknown"}) is changing this CA; wait for it, or remove the file if that process is gone`,
  );
}

function readHolder(path: string): string {
  try {
    return readFileSync(path, "utf8").trim();
  } catch {
    return ""; // removed meanwhile: the next attempt takes it
  }
}
