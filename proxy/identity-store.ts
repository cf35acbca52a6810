// The identity in use, and the only way it changes: a reload reads and validates every file
// (identity.ts) and swaps only what validated ("if reloading failed, the old state is kept").
// The watcher watches directories, not files, so rename-into-place and `..data` symlink swaps
// are seen; bursts of file events are debounced into one reload, and reloads never overlap.
import { EventEmitter } from "node:events";
import { basename, dirname } from "node:path";
import type { FSWatcher } from "chokidar";
import {
  type Identity,
  IdentityError,
  type IdentityField,
  type IdentityPaths,
  identityFiles,
  loadIdentity,
  type Reuse,
} from "./identity.js";

const LEAF_FIELDS = new Set<IdentityField>(["tls.cert", "tls.key", "tls.clientCert", "tls.clientKey"]);

export interface IdentityChange {
  /** What caused the reload: "SIGHUP", "file server.crt", ... */
  trigger: string;
  previous: Identity;
  next: Identity;
  trustChanged: boolean;
  serverChanged: boolean;
  clientChanged: boolean;
}

export interface IdentityStoreEvents {
  change: [IdentityChange];
  failed: [IdentityError | Error, string];
}

/**
 * Holds the identity in use and replaces it only with one that validated. Reloads are
 * serialized; bursts of file events are debounced into one reload.
 */
export class IdentityStore extends EventEmitter<IdentityStoreEvents> {
  private watcher: FSWatcher | null = null;
  private debounce: NodeJS.Timeout | null = null;
  private reloading: Promise<boolean> | null = null;
  private again = false;
  private closed = false;
  lastReload: { at: Date; result: "ok" | "failed" | "unchanged"; trigger: string; error?: string } | null = null;

  constructor(
    public current: Identity,
    private readonly paths: IdentityPaths,
    private readonly dnsName: string,
    /**
     * The last word before an identity is taken: throws (an IdentityError) when the listeners
     * could not use it, e.g. a key OpenSSL refuses at the configured security level. Without it,
     * such an identity would be half taken: recorded here, refused by the TLS context.
     */
    private readonly usable: (next: Identity) => void,
    /** limits.reloadDebounceMs and limits.reloadRetryMs. */
    private readonly timing: { reloadDebounceMs: number; reloadRetryMs: number },
  ) {
    super();
  }

  /**
   * Loads and validates again; swaps only when the files changed and validate. With `settle`
   * (file events), a failure is retried once after reloadRetryMs before it is reported: a certificate
   * and its key replaced by two renames are briefly a mismatched pair, and that is not a failure.
   */
  reload(trigger: string, options: { settle?: boolean } = {}): Promise<boolean> {
    if (this.reloading) {
      this.again = true;
      return this.reloading;
    }
    this.reloading = this.reloadOnce(trigger, options.settle ?? false).finally(() => {
      this.reloading = null;
      if (this.again) {
        this.again = false;
        void this.reload(trigger, options);
      }
    });
    return this.reloading;
  }

  private async reloadOnce(trigger: string, settle: boolean): Promise<boolean> {
    try {
      const next = await loadIdentity(this.paths, { dnsName: this.dnsName, version: this.current.version + 1 });
      const changed = this.apply(next, trigger);
      this.lastReload = { at: new Date(), result: changed ? "ok" : "unchanged", trigger };
      return changed;
    } catch (err) {
      if (settle && !this.closed) {
        await new Promise((resolve) => setTimeout(resolve, this.timing.reloadRetryMs));
        return this.reloadOnce(trigger, false);
      }
      this.lastReload = { at: new Date(), result: "failed", trigger, error: (err as Error).message };
      this.emit("failed", err as Error, trigger);
      return err instanceof IdentityError ? this.applyOtherPart(err, trigger) : false;
    }
  }

  /**
   * One broken part must not hold the other back: a broken certificate must not delay a new CRL
   * (revocation), a broken CRL must not delay a rotated certificate. The part at fault stays as
   * it is in use; the other is taken if it validates with it.
   */
  private async applyOtherPart(err: IdentityError, trigger: string): Promise<boolean> {
    const current = this.current;
    const reuse: Reuse = LEAF_FIELDS.has(err.field)
      ? { leaves: { server: current.server, client: current.client } }
      : { trust: { caPem: current.ca.pem, crlPem: current.crl?.pem ?? null } };
    try {
      const next = await loadIdentity(this.paths, { dnsName: this.dnsName, version: current.version + 1, reuse });
      return this.apply(
        next,
        `${trigger} (${LEAF_FIELDS.has(err.field) ? "CA bundle and CRL only" : "certificates only"})`,
      );
    } catch {
      return false;
    }
  }

  /** Takes `next` into use when it differs from the identity in use. */
  private apply(next: Identity, trigger: string): boolean {
    const previous = this.current;
    const serverChanged =
      !next.server.certPem.equals(previous.server.certPem) || !next.server.keyPem.equals(previous.server.keyPem);
    const clientChanged =
      !next.client.certPem.equals(previous.client.certPem) || !next.client.keyPem.equals(previous.client.keyPem);
    const trustChanged = next.trustHash !== previous.trustHash;
    if (!serverChanged && !clientChanged && !trustChanged) return false;
    this.usable(next);
    this.current = next;
    this.emit("change", { trigger, previous, next, trustChanged, serverChanged, clientChanged });
    return true;
  }

  /** Watches the directories of every file; any event there schedules a (debounced) reload. */
  async watch(): Promise<void> {
    const { watch } = await import("chokidar");
    const files = identityFiles(this.paths);
    const dirs = [...new Set(files.map((f) => dirname(f)))];
    const names = new Set(files.map((f) => basename(f)));
    this.watcher = watch(dirs, { ignoreInitial: true, depth: 0, followSymlinks: false });
    this.watcher.on("all", (_event, path) => {
      const name = basename(path);
      // Our files, atomic-write temporaries renamed onto them, and Kubernetes/Vault `..data` swaps.
      if (names.has(name) || name.startsWith("..") || dirs.includes(path)) this.schedule(`file ${name}`);
    });
    this.watcher.on("error", (err) => this.emit("failed", err as Error, "watcher"));
    await new Promise<void>((resolve) => this.watcher?.once("ready", () => resolve()));
  }

  private schedule(trigger: string): void {
    if (this.debounce) clearTimeout(this.debounce);
    this.debounce = setTimeout(() => {
      this.debounce = null;
      void this.reload(trigger, { settle: true });
    }, this.timing.reloadDebounceMs);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.debounce) clearTimeout(this.debounce);
    await this.watcher?.close();
    this.watcher = null;
    await this.reloading;
  }
}
