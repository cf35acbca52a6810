// Writing files the sidecar and the operator's tools share: by rename, so that a watcher (the
// identity store's) never reads half a file, keeping the owner of the file replaced. The
// development CA (certs-dev/), the ACME manager and the CRL fetcher all write through here.
import { chmodSync, chownSync, mkdirSync, renameSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";

/**
 * Writes by rename in the same directory: readers see the old file or the new one, never half.
 * A replaced file keeps its owner and group: an operator who gave a key (0600) to the user a
 * sidecar runs as (a container's uid 10001, a systemd User=) must not lose that sidecar on the
 * next rotation because root wrote the new key.
 */
export function writeAtomic(path: string, data: string | Buffer, mode: number): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = join(dirname(path), `.${Date.now().toString(36)}.${process.pid}.tmp`);
  writeFileSync(tmp, data, { mode });
  chmodSync(tmp, mode);
  const previous = ownerOf(path);
  if (previous && (previous.uid !== process.getuid?.() || previous.gid !== process.getgid?.())) {
    try {
      chownSync(tmp, previous.uid, previous.gid);
    } catch (err) {
      // Only root may give a file away; anyone else writes as themselves, as before.
      if ((err as NodeJS.ErrnoException).code !== "EPERM") throw err;
    }
  }
  renameSync(tmp, path);
}

function ownerOf(path: string): { uid: number; gid: number } | null {
  try {
    const { uid, gid } = statSync(path);
    return { uid, gid };
  } catch {
    return null;
  }
}
