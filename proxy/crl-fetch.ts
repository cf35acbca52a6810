// The CRL fetcher: downloads the CA's CRLs from tls.crlUrl and from the CRL distribution points of
// our own chain and CA bundle, every tls.crlRefreshMs and when a CRL in use reaches its
// nextUpdate, and writes them to tls.crl (by rename). The identity store then reloads the file as
// it does for any change, closing open connections of a newly revoked peer. Nothing is written
// that the store would refuse: each fetched CRL must be signed by a CA of tls.ca, be inside its
// validity and not be older than the one in use (a stale cache or a replay must not bring a
// revoked certificate back), and the whole file must pass the store's own CRL validation.
// A URL that fails keeps its issuer's CRL in use; it is retried with backoff, and when the CRL
// passes its nextUpdate the sidecar fails closed for that CA, as it does today.
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { rootCertificates } from "node:tls";
import { Agent, request } from "undici";
import type { Config } from "../config/schema.js";
import { writeAtomic } from "./files.js";
import { findingText, validateCrls } from "./identity.js";
import type { Logger } from "./log.js";
import type { CrlFetchSample } from "./metrics.js";
import { type Crl, crlDistributionPoints, crlSigner, parseCrl, pemBlocks } from "./x509.js";

/** A CRL of a large CA runs to megabytes; anything past this is refused, not buffered. */
const MAX_BYTES = 32 * 1024 * 1024;
const TIMEOUT_MS = 15_000;
/** A CRL whose thisUpdate is further ahead than this is from a clock we do not share. */
const CLOCK_SKEW_MS = 5 * 60_000;

export interface CrlFetchStatus {
  urls: string[];
  last_success: string | null;
  last_error: { at: string; url: string; reason: string } | null;
  next_fetch: string | null;
}

interface Fetched {
  url: string;
  crl: Crl;
  pem: string;
}

function toPem(der: Buffer): string {
  const body = der.toString("base64").replace(/(.{64})/g, "$1\n");
  return `-----BEGIN X509 CRL-----\n${body.endsWith("\n") ? body : `${body}\n`}-----END X509 CRL-----\n`;
}

export class CrlFetcher {
  status: CrlFetchStatus;
  private readonly perUrl = new Map<string, CrlFetchSample>();
  private readonly startedAt = Date.now() / 1000;
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<boolean> | null = null;
  private stopped = false;
  private failures = 0;
  /** The nextUpdate of each CRL in use: a fetch is due at the earliest. */
  private nextUpdates: number[] = [];
  private dispatcher: Agent | null = null;

  constructor(
    private readonly config: Config,
    private readonly logger: Logger,
  ) {
    this.status = { urls: config.tls.crlUrl, last_success: null, last_error: null, next_fetch: null };
  }

  /** Per-URL counts for mtls_crl_fetch_total and mtls_crl_last_fetch_timestamp_seconds. */
  samples(): CrlFetchSample[] {
    return [...this.perUrl.values()];
  }

  private sample(url: string): CrlFetchSample {
    let s = this.perUrl.get(url);
    if (!s) {
      s = { url, ok: 0, failed: 0, lastSuccess: this.startedAt };
      this.perUrl.set(url, s);
    }
    return s;
  }

  /** tls.crlUrl, then the http(s) distribution points named by tls.cert's chain and tls.ca. */
  private async urls(): Promise<string[]> {
    const urls = [...this.config.tls.crlUrl];
    for (const file of [this.config.tls.cert, this.config.tls.ca]) {
      let text: string;
      try {
        text = readFileSync(file, "latin1");
      } catch {
        continue; // no certificate yet (ACME's first order), or no CA bundle: nothing to learn there
      }
      for (const block of pemBlocks(text, "CERTIFICATE")) {
        try {
          urls.push(...(await crlDistributionPoints(new X509Certificate(block.der))));
        } catch {
          // a certificate that does not parse is the identity store's to report
        }
      }
    }
    return [...new Set(urls)];
  }

  /**
   * HTTPS to a distribution point trusts the system's roots, tls.ca and acme.caBundle: the CA's
   * own servers often carry a certificate of the CA. The CRL's signature is what is trusted.
   */
  private agent(): Agent {
    if (this.dispatcher) return this.dispatcher;
    const ca: Array<string | Buffer> = [...rootCertificates];
    for (const file of [this.config.tls.ca, this.config.acme?.caBundle]) {
      if (!file) continue;
      try {
        ca.push(readFileSync(file));
      } catch {
        // unreadable: the identity store (tls.ca) or the ACME manager (caBundle) says so
      }
    }
    this.dispatcher = new Agent({ connect: { ca, timeout: TIMEOUT_MS } });
    return this.dispatcher;
  }

  private async download(url: string): Promise<Fetched[]> {
    const response = await request(url, {
      dispatcher: this.agent(),
      headersTimeout: TIMEOUT_MS,
      bodyTimeout: TIMEOUT_MS,
      headers: { accept: "application/pkix-crl, application/x-pem-file;q=0.9, */*;q=0.1" },
    });
    if (response.statusCode !== 200) {
      await response.body.dump();
      throw new Error(`HTTP ${response.statusCode}`);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    for await (const chunk of response.body) {
      size += (chunk as Buffer).length;
      if (size > MAX_BYTES) throw new Error(`larger than ${MAX_BYTES} bytes`);
      chunks.push(chunk as Buffer);
    }
    const body = Buffer.concat(chunks);
    // RFC 5280 §4.2.1.13: DER; some CAs serve PEM (the label CRL is read too).
    const text = body.subarray(0, 64).toString("latin1");
    const pems = text.includes("-----BEGIN")
      ? [...pemBlocks(body.toString("latin1"), "X509 CRL"), ...pemBlocks(body.toString("latin1"), "CRL")].map((b) =>
          toPem(b.der),
        )
      : [toPem(body)];
    if (pems.length === 0) throw new Error("no CRL in the answer");
    const out: Fetched[] = [];
    for (const pem of pems) {
      try {
        out.push({ url, pem, crl: await parseCrl(pem) });
      } catch (err) {
        throw new Error(`the answer is not a CRL (${(err as Error).message})`);
      }
    }
    return out;
  }

  /** Whether one fetched CRL may replace `inUse` (the current one of the same issuer): why not, or null. */
  private async refusal(
    f: Fetched,
    bundle: X509Certificate[],
    inUse: Crl | undefined,
    now: number,
  ): Promise<string | null> {
    if (!(await crlSigner(f.crl, bundle))) return `the CRL of ${f.crl.issuer} is not signed by any CA in tls.ca`;
    if (f.crl.nextUpdate && f.crl.nextUpdate.getTime() < now)
      return `the CRL of ${f.crl.issuer} is past its nextUpdate (${f.crl.nextUpdate.toISOString()})`;
    if (f.crl.thisUpdate.getTime() > now + CLOCK_SKEW_MS)
      return `the CRL of ${f.crl.issuer} is dated in the future (${f.crl.thisUpdate.toISOString()})`;
    if (inUse && f.crl.thisUpdate < inUse.thisUpdate)
      return `the CRL of ${f.crl.issuer} (thisUpdate ${f.crl.thisUpdate.toISOString()}) is older than the one in use (${inUse.thisUpdate.toISOString()})`;
    return null;
  }

  /**
   * One round: every URL fetched, each CRL checked, merged with the CRLs in use (by issuer), the
   * whole validated, written when it changed. True when every URL gave a CRL that was taken.
   */
  fetchOnce(): Promise<boolean> {
    this.running ??= this.round().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async round(): Promise<boolean> {
    const { tls } = this.config;
    const crlFile = tls.crl as string;
    const now = Date.now();
    let caPem: Buffer;
    try {
      caPem = readFileSync(tls.ca);
    } catch (err) {
      this.fail(tls.ca, `tls.ca (${tls.ca}): cannot read: ${(err as NodeJS.ErrnoException).code}`);
      return false;
    }
    const bundle = pemBlocks(caPem.toString("latin1"), "CERTIFICATE").map((b) => new X509Certificate(b.der));
    // The CRLs in use, by issuer: replaced one by one, so that a URL that fails keeps its own.
    const current = new Map<string, { crl: Crl; pem: string }>();
    let currentText = "";
    try {
      currentText = readFileSync(crlFile, "latin1");
      for (const block of pemBlocks(currentText, "X509 CRL")) {
        const crl = await parseCrl(block.der);
        current.set(crl.issuer, { crl, pem: toPem(block.der) });
      }
    } catch {
      // no file yet: everything comes from the fetch
    }
    const urls = await this.urls();
    this.status.urls = urls;
    let complete = urls.length > 0;
    const next = new Map(current);
    for (const url of urls) {
      let fetched: Fetched[];
      try {
        fetched = await this.download(url);
      } catch (err) {
        complete = false;
        this.fail(url, (err as Error).message || String(err));
        continue;
      }
      let refused: string | null = null;
      for (const f of fetched) refused ??= await this.refusal(f, bundle, current.get(f.crl.issuer)?.crl, now);
      if (refused) {
        complete = false;
        this.fail(url, refused);
        continue;
      }
      for (const f of fetched) next.set(f.crl.issuer, { crl: f.crl, pem: f.pem });
      const s = this.sample(url);
      s.ok++;
      s.lastSuccess = Date.now() / 1000;
    }
    this.nextUpdates = [...next.values()].flatMap((e) => (e.crl.nextUpdate ? [e.crl.nextUpdate.getTime()] : []));
    const merged = [...next.values()].map((e) => e.pem).join("");
    if (merged && merged !== currentText) {
      const check = await validateCrls({ ca: tls.ca, crl: crlFile }, caPem, Buffer.from(merged));
      if (check.failed) {
        const first = check.findings.find((f) => f.level === "error");
        this.fail(
          urls.join(" "),
          `the fetched CRLs would be refused, so tls.crl was not written: ${first ? findingText(first) : "invalid"}`,
        );
        return false;
      }
      writeAtomic(crlFile, merged, 0o644);
      this.logger.info({
        event: "crl_fetched",
        file: crlFile,
        crls: check.lists.map((l) => ({
          issuer: l.issuer,
          this_update: l.thisUpdate.toISOString(),
          next_update: l.nextUpdate?.toISOString() ?? null,
          revoked: l.revoked.size,
        })),
      });
    }
    if (complete) {
      this.failures = 0;
      this.status.last_success = new Date().toISOString();
    }
    return complete;
  }

  private fail(url: string, reason: string): void {
    this.failures++;
    const s = this.sample(url);
    s.failed++;
    this.status.last_error = { at: new Date().toISOString(), url, reason };
    this.logger.warn({ event: "crl_fetch_failed", url, reason, attempt: this.failures });
  }

  /** Fetches now, then every crlRefreshMs, at the earliest nextUpdate, and sooner (backoff) after a failure. */
  start(): void {
    this.stopped = false;
    void this.tick();
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    const ok = await this.fetchOnce().catch((err: Error) => {
      this.fail("(round)", err.message);
      return false;
    });
    if (this.stopped) return;
    const refresh = this.config.tls.crlRefreshMs;
    let delay = ok ? refresh : Math.min(refresh, 1_000 * 2 ** Math.min(this.failures, 20)) * (0.5 + Math.random() / 2);
    const nextUpdate = this.earliestNextUpdate();
    if (nextUpdate !== null) delay = Math.min(delay, nextUpdate - Date.now());
    this.status.next_fetch = new Date(Date.now() + delay).toISOString();
    this.timer = setTimeout(() => void this.tick(), Math.max(0, Math.round(delay)));
    this.timer.unref();
  }

  private earliestNextUpdate(): number | null {
    const times = this.nextUpdates.filter((t) => t > Date.now());
    return times.length ? Math.min(...times) : null;
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.running?.catch(() => undefined);
    await this.dispatcher?.close();
    this.dispatcher = null;
  }
}
