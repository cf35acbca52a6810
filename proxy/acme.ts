// The ACME manager: obtains the sidecar's certificate from a CA over ACME (RFC 8555, through the
// acme-client package) and renews it once `acme.renewAt` (70 %) of its lifetime has passed. It
// only writes tls.key and tls.cert (by rename, as `certs rotate` does); the identity store picks
// the files up through its watcher and validates them like any rotation, so the identity in use
// changes in one place only. A certificate the sidecar would refuse is never written: it is
// validated first, with the same validator, against the CA bundle and CRL in use.
// Failed orders are retried with jittered exponential backoff; until one succeeds, the current
// certificate stays in use. What happened is kept in acme-state.json beside tls.key (no secret in
// it), which /status shows and `ashmesh check --config` reads.
import { generateKeyPairSync, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import https from "node:https";
import { dirname, join } from "node:path";
import { Agent, request } from "undici";
import { ConfigError } from "../config/load.js";
import type { AcmeConfig, Config } from "../config/schema.js";
import type { ChallengeResponder } from "./acme-challenge.js";
import { writeAtomic } from "./files.js";
import { findingText, type IdentityPaths, validateIdentity } from "./identity.js";
import type { Logger } from "./log.js";
import { pemBlocks, serialOf, subjectAltNames } from "./x509.js";

type AcmeModule = typeof import("acme-client");
type AcmeClient = InstanceType<AcmeModule["Client"]>;

/** What /status shows and acme-state.json holds. No key, no EAB HMAC. */
export interface AcmeStatus {
  directory: string;
  names: string[];
  challenge: string;
  account_url: string | null;
  certificate: { serial: string; not_before: string; not_after: string } | null;
  next_renewal: string | null;
  next_retry: string | null;
  last_order: { at: string; result: "ok" | "failed"; reason: string; took_ms: number; serial?: string } | null;
  last_success: string | null;
  last_error: { at: string; reason: string } | null;
  consecutive_failures: number;
}

export interface AcmeOptions {
  /** The clock renewals are judged by; tests move it instead of waiting. Date.now by default. */
  now?: () => number;
  /** Source of jitter, in [0, 1). Math.random by default. */
  random?: () => number;
}

/** What the files on disk are worth to the manager. */
type Files =
  | { usable: true; serial: string; notBefore: number; notAfter: number; dueAt: number }
  | { usable: false; reason: string };

const LEAF_FIELDS = new Set(["tls.cert", "tls.key"]);
/** A renewal is moved earlier by up to this share of the time to it (at most an hour), per certificate. */
const JITTER_SHARE = 0.05;
const JITTER_MAX_MS = 3_600_000;
const HTTP_TIMEOUT_MS = 30_000;

let loaded: Promise<AcmeModule> | null = null;
/** The HTTPS agent of each ACME server origin: acme-client's axios instance is shared by every client. */
const agents = new Map<string, https.Agent>();

/** acme-client, loaded on first use (it brings axios and node-forge), set up once for the process. */
function acmeClient(): Promise<AcmeModule> {
  loaded ??= import("acme-client").then((module) => {
    const acme = (module as { default?: AcmeModule }).default ?? module;
    // The manager retries with its own backoff; axios's own retries (5, up to 75 s) would hide it.
    (acme.axios.defaults as unknown as { acmeSettings: { retryMaxAttempts: number } }).acmeSettings.retryMaxAttempts =
      0;
    acme.axios.defaults.timeout = HTTP_TIMEOUT_MS;
    // acme-client's response interceptor turns a network error (no response: ECONNREFUSED, a
    // reset, a timeout) into "Cannot read properties of undefined" once it stops retrying. Ahead
    // of it, such an error becomes a plain one without `config`, which it passes on as it is.
    const handlers = (acme.axios.interceptors.response as unknown as { handlers?: unknown[] }).handlers;
    handlers?.unshift({
      fulfilled: null,
      rejected: (error: { response?: unknown; config?: unknown; message?: string; code?: string }) => {
        if (!error?.config || error.response) return Promise.reject(error);
        return Promise.reject(
          Object.assign(new Error(error.message || error.code || "network error"), { code: error.code }),
        );
      },
      synchronous: false,
      runWhen: null,
    });
    acme.axios.interceptors.request.use((request) => {
      const agent = request.url ? agents.get(new URL(request.url).origin) : undefined;
      if (agent) request.httpsAgent = agent;
      return request;
    });
    return acme;
  });
  return loaded;
}

function newKey(type: AcmeConfig["keyType"]): string {
  const options =
    type === "ecdsa-p256" || type === "ecdsa-p384"
      ? ({ type: "ec", namedCurve: type === "ecdsa-p256" ? "P-256" : "P-384" } as const)
      : ({ type: "rsa", modulusLength: type === "rsa-2048" ? 2048 : 3072 } as const);
  const { privateKey } =
    options.type === "ec"
      ? generateKeyPairSync("ec", { namedCurve: options.namedCurve })
      : generateKeyPairSync("rsa", { modulusLength: options.modulusLength });
  return privateKey.export({ type: "pkcs8", format: "pem" }) as string;
}

/** The message of an error from axios, acme-client or the validator, on one line. */
function reasonOf(err: unknown): string {
  const e = err as { message?: string; code?: string };
  return (e?.message ?? String(err)).replace(/\s+/g, " ").trim() || e?.code || "unknown error";
}

/** TLS verification failures: the CA bundle, not the CA's availability, is wrong. */
const UNTRUSTED = /^(UNABLE_TO_|SELF_SIGNED_CERT|DEPTH_ZERO_SELF_SIGNED|CERT_|ERR_TLS_CERT_ALTNAME)/;

export class AcmeManager {
  readonly counts = { ok: 0, failed: 0 };
  status: AcmeStatus;
  private client: AcmeClient | null = null;
  private timer: NodeJS.Timeout | null = null;
  private wake: (() => void) | null = null;
  private running: Promise<void> | null = null;
  private stopped = false;
  private readonly jitter = new Map<string, number>();
  private readonly now: () => number;
  private readonly random: () => number;
  private readonly acme: AcmeConfig;
  private readonly paths: IdentityPaths;

  constructor(
    private readonly config: Config,
    private readonly logger: Logger,
    readonly responder: ChallengeResponder,
    options: AcmeOptions = {},
  ) {
    if (!config.acme) throw new Error("AcmeManager needs the acme section");
    this.acme = config.acme;
    this.paths = config.tls;
    this.now = options.now ?? Date.now;
    this.random = options.random ?? Math.random;
    this.status = {
      directory: this.acme.directory,
      names: this.acme.names,
      challenge: this.acme.challenge,
      account_url: null,
      certificate: null,
      next_renewal: null,
      next_retry: null,
      last_order: null,
      last_success: null,
      last_error: null,
      consecutive_failures: 0,
    };
    const previous = AcmeManager.readState(config);
    if (previous) {
      // Carried over a restart: when the last order was, and how it went.
      this.status.last_order = previous.last_order;
      this.status.last_success = previous.last_success;
      this.status.last_error = previous.last_error;
      this.status.account_url = previous.account_url;
    }
  }

  /** acme-state.json, beside tls.key. */
  static statePath(config: Pick<Config, "tls">): string {
    return join(dirname(config.tls.key), "acme-state.json");
  }

  static readState(config: Pick<Config, "tls">): AcmeStatus | null {
    try {
      return JSON.parse(readFileSync(AcmeManager.statePath(config), "utf8")) as AcmeStatus;
    } catch {
      return null;
    }
  }

  private saveState(): void {
    try {
      writeAtomic(AcmeManager.statePath(this.config), `${JSON.stringify(this.status, null, 2)}\n`, 0o644);
    } catch (err) {
      this.logger.warn({ event: "acme_state_not_saved", reason: reasonOf(err) });
    }
  }

  /** The HTTPS agent for the ACME server: the CA bundle of acme.caBundle, else the system's roots. */
  private agentOptions(): { ca?: Buffer } {
    if (!this.acme.caBundle) return {};
    try {
      return { ca: readFileSync(this.acme.caBundle) };
    } catch (err) {
      throw new ConfigError(
        `acme.caBundle (ACME_CA_BUNDLE) ${this.acme.caBundle}: cannot read: ${(err as NodeJS.ErrnoException).code ?? reasonOf(err)}`,
      );
    }
  }

  /**
   * Reads the directory once at start. A URL that answers with anything but an ACME directory, a
   * name that does not resolve, or a server the CA bundle does not trust is a configuration error
   * (exit 2). A CA that is down is not: the reason is returned, and orders retry.
   */
  async verifyDirectory(): Promise<string | null> {
    const url = this.acme.directory;
    const field = `acme.directory (ACME_DIRECTORY) ${url}`;
    const dispatcher = new Agent({ connect: { ...this.agentOptions(), timeout: 10_000 } });
    try {
      const response = await request(url, { dispatcher, headersTimeout: 10_000, bodyTimeout: 10_000 });
      const text = await response.body.text();
      if (response.statusCode >= 500) return `${url} answered HTTP ${response.statusCode}`;
      let directory: Record<string, unknown> | null = null;
      try {
        directory = JSON.parse(text) as Record<string, unknown>;
      } catch {
        directory = null;
      }
      const missing = ["newNonce", "newAccount", "newOrder"].filter((k) => typeof directory?.[k] !== "string");
      if (response.statusCode !== 200 || missing.length > 0) {
        throw new ConfigError(
          `${field} is not an ACME directory: it answered HTTP ${response.statusCode}${
            response.statusCode === 200 ? ` without ${missing.join(", ")}` : ""
          } (RFC 8555 §7.1.1); use the CA's directory URL (step-ca: https://CA/acme/PROVISIONER/directory, Vault: https://VAULT/v1/pki/acme/directory)`,
        );
      }
      if (directory?.meta && (directory.meta as Record<string, unknown>).externalAccountRequired && !this.acme.eab) {
        throw new ConfigError(
          `${field}: the CA requires an external account binding: set ACME_EAB_KID and ACME_EAB_HMAC (acme.eab)`,
        );
      }
      return null;
    } catch (err) {
      if (err instanceof ConfigError) throw err;
      const code = (err as { code?: string; cause?: { code?: string } }).cause?.code ?? (err as { code?: string }).code;
      if (code === "ENOTFOUND") throw new ConfigError(`${field}: the host name does not resolve (ENOTFOUND)`);
      if (code && UNTRUSTED.test(code)) {
        throw new ConfigError(
          `${field}: the server's certificate is not trusted (${code}): acme.caBundle (ACME_CA_BUNDLE) must hold the CA that signed the ACME server's HTTPS certificate`,
        );
      }
      return `${url}: ${code ?? reasonOf(err)}`;
    } finally {
      await dispatcher.close();
    }
  }

  /** Whether the files hold a certificate worth keeping, and when it is due for renewal. */
  async inspect(): Promise<Files> {
    const { findings } = await validateIdentity(this.paths, { dnsName: this.config.service.dnsName });
    const leafError = findings.find((f) => f.level === "error" && LEAF_FIELDS.has(f.field));
    if (leafError) return { usable: false, reason: findingText(leafError) };
    let cert: X509Certificate;
    try {
      const block = pemBlocks(readFileSync(this.paths.cert, "latin1"), "CERTIFICATE")[0];
      if (!block) return { usable: false, reason: `tls.cert (${this.paths.cert}): no certificate` };
      cert = new X509Certificate(block.der);
    } catch (err) {
      return { usable: false, reason: `tls.cert (${this.paths.cert}): ${reasonOf(err)}` };
    }
    const { dns } = subjectAltNames(cert);
    const missing = this.acme.names.filter((n) => !dns.includes(n));
    if (missing.length > 0) return { usable: false, reason: `the certificate does not name ${missing.join(", ")}` };
    const notBefore = new Date(cert.validFrom).getTime();
    const notAfter = new Date(cert.validTo).getTime();
    const serial = serialOf(cert);
    const renewAt = notBefore + this.acme.renewAt * (notAfter - notBefore);
    let jitter = this.jitter.get(serial);
    if (jitter === undefined) {
      jitter = this.random() * Math.min(JITTER_SHARE * (renewAt - notBefore), JITTER_MAX_MS);
      this.jitter.set(serial, jitter);
    }
    this.status.certificate = {
      serial,
      not_before: new Date(notBefore).toISOString(),
      not_after: new Date(notAfter).toISOString(),
    };
    return { usable: true, serial, notBefore, notAfter, dueAt: Math.floor(renewAt - jitter) };
  }

  /**
   * Before the sidecar starts: when the files hold no usable certificate, orders one, answering the
   * challenge on a listener of its own (the inbound port has no TLS listener yet), and retries with
   * backoff until it has one (or stop()). A usable certificate that is due is renewed after start.
   */
  async ensureCertificate(): Promise<void> {
    let files = await this.inspect();
    if (files.usable) return;
    const { acme } = this;
    if (acme.challenge === "tls-alpn-01") await this.responder.listenBootstrap(this.config.inbound.listen);
    try {
      while (!files.usable && !this.stopped) {
        const ok = await this.attempt(files.reason, null);
        if (!ok) await this.sleep(this.status.next_retry ? Date.parse(this.status.next_retry) - Date.now() : 0);
        files = await this.inspect();
      }
    } finally {
      await this.responder.closeBootstrap();
    }
    if (!files.usable) throw new Error(`stopped before a certificate was issued: ${files.reason}`);
  }

  /** Schedules renewals from now on. */
  start(): void {
    this.stopped = false;
    void this.check();
  }

  /**
   * Orders when the certificate is due (or unusable), then schedules the next check: the
   * renewal time, or the retry after a failure. Concurrent calls share one run.
   */
  check(): Promise<void> {
    this.running ??= this.checkOnce().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async checkOnce(): Promise<void> {
    if (this.stopped) return;
    const files = await this.inspect();
    if (files.usable && this.now() < files.dueAt) {
      this.status.next_renewal = new Date(files.dueAt).toISOString();
      this.saveState();
      this.schedule(files.dueAt - this.now());
      return;
    }
    const reason = files.usable
      ? `renewal due (${Math.round(this.acme.renewAt * 100)} % of the lifetime passed)`
      : files.reason;
    const ok = await this.attempt(reason, files.usable ? files : null);
    if (this.stopped) return;
    if (ok) {
      const next = await this.inspect();
      if (next.usable) {
        this.status.next_renewal = new Date(next.dueAt).toISOString();
        this.saveState();
        this.schedule(next.dueAt - this.now());
        return;
      }
    }
    const retry = this.status.next_retry ? Date.parse(this.status.next_retry) - Date.now() : this.acme.retryMinMs;
    this.schedule(retry);
  }

  /** One order; on failure, counts it, logs it and sets next_retry. True when a certificate was written. */
  private async attempt(reason: string, current: Extract<Files, { usable: true }> | null): Promise<boolean> {
    const started = Date.now();
    try {
      const serial = await this.order(reason, current !== null);
      this.counts.ok++;
      this.status.consecutive_failures = 0;
      this.status.next_retry = null;
      this.status.last_success = new Date().toISOString();
      this.status.last_order = {
        at: this.status.last_success,
        result: "ok",
        reason,
        took_ms: Date.now() - started,
        serial,
      };
      this.saveState();
      return true;
    } catch (err) {
      const message = reasonOf(err);
      this.counts.failed++;
      const attempt = ++this.status.consecutive_failures;
      // Exponential from retryMinMs, jittered down to half so that sidecars drift apart; never
      // longer than a tenth of what is left of the current certificate.
      let delay = Math.min(this.acme.retryMaxMs, this.acme.retryMinMs * 2 ** (attempt - 1));
      if (current) delay = Math.min(delay, Math.max(this.acme.retryMinMs, (current.notAfter - this.now()) / 10));
      delay = Math.round(delay * (0.5 + this.random() / 2));
      const at = new Date().toISOString();
      this.status.next_retry = new Date(Date.now() + delay).toISOString();
      this.status.last_error = { at, reason: message };
      this.status.last_order = { at, result: "failed", reason: message, took_ms: Date.now() - started };
      this.saveState();
      this.logger.error({
        event: "acme_renewal_failed",
        reason: message,
        attempt,
        retry_in_ms: delay,
        kept_serial: current?.serial ?? null,
        renewal: current !== null,
      });
      return false;
    }
  }

  /** Orders a certificate, validates it as a reload would, and writes key and certificate. Returns its serial. */
  private async order(reason: string, renewal: boolean): Promise<string> {
    const { acme } = this;
    const started = Date.now();
    this.logger.info({
      event: "acme_order_started",
      reason,
      renewal,
      names: acme.names,
      directory: acme.directory,
      challenge: acme.challenge,
    });
    const lib = await acmeClient();
    const client = await this.account(lib);
    const keyPem = newKey(acme.keyType);
    const [, csr] = await lib.crypto.createCsr({ commonName: acme.names[0], altNames: acme.names }, keyPem);
    const responder = this.responder;
    const chainPem = await client.auto({
      csr,
      ...(acme.email ? { email: acme.email } : {}),
      termsOfServiceAgreed: true,
      // acme-client's own pre-check connects to port 443 or 80 of the name from here, which is
      // not where the CA looks (and needs DNS the sidecar may not have): the CA's answer decides.
      skipChallengeVerification: true,
      challengePriority: [acme.challenge],
      challengeCreateFn: async (authz, challenge, keyAuthorization) => {
        // acme-client's types predate tls-alpn-01; its code supports it.
        if ((challenge.type as string) === "tls-alpn-01") {
          const [alpnKey, alpnCert] = await lib.crypto.createAlpnCertificate(
            authz,
            keyAuthorization,
            await lib.crypto.createPrivateEcdsaKey(),
          );
          responder.addTlsAlpn(authz.identifier.value, alpnCert, alpnKey);
        } else responder.addHttp(challenge.token, keyAuthorization);
      },
      challengeRemoveFn: async (authz, challenge) => {
        if ((challenge.type as string) === "tls-alpn-01") responder.removeTlsAlpn(authz.identifier.value);
        else responder.removeHttp(challenge.token);
      },
    });
    const certPem = Buffer.from(chainPem.endsWith("\n") ? chainPem : `${chainPem}\n`);
    const leaf = { certPem, keyPem: Buffer.from(keyPem) };
    const { identity, findings } = await validateIdentity(this.paths, {
      dnsName: this.config.service.dnsName,
      reuse: { leaves: { server: leaf, client: leaf } },
    });
    if (!identity) {
      const first = findings.find((f) => f.level === "error");
      throw new Error(
        `the CA issued a certificate the sidecar would refuse, so it was not written: ${first ? findingText(first) : "invalid"}${
          first?.field === "tls.cert" && /chain/.test(first.message)
            ? "; add the ACME CA's root to tls.ca (see README: Certificates from step-ca, Vault or any ACME CA)"
            : ""
        }`,
      );
    }
    // Key first, then the certificate: the store settles a pair caught between the two renames.
    writeAtomic(this.paths.key, leaf.keyPem, 0o600);
    writeAtomic(this.paths.cert, certPem, 0o644);
    const s = identity.server.summary;
    this.logger.info({
      event: "acme_certificate_issued",
      serial: s.serial,
      names: acme.names,
      issuer: s.issuer,
      not_before: s.notBefore.toISOString(),
      not_after: s.notAfter.toISOString(),
      renewal,
      took_ms: Date.now() - started,
    });
    return s.serial;
  }

  /** The ACME client with its account registered (or found again: the key is the account). */
  private async account(lib: AcmeModule): Promise<AcmeClient> {
    if (this.client) return this.client;
    const { acme } = this;
    agents.set(new URL(acme.directory).origin, new https.Agent({ keepAlive: true, ...this.agentOptions() }));
    let accountKey: Buffer;
    try {
      accountKey = readFileSync(acme.accountKey);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
      accountKey = Buffer.from(newKey("ecdsa-p256"));
      writeAtomic(acme.accountKey, accountKey, 0o600);
      this.logger.info({ event: "acme_account_key_created", file: acme.accountKey });
    }
    const client = new lib.Client({
      directoryUrl: acme.directory,
      accountKey,
      ...(acme.eab ? { externalAccountBinding: { kid: acme.eab.kid, hmacKey: acme.eab.hmac } } : {}),
      // Polling of authorizations and orders, not retries of failures (those are ours).
      backoffAttempts: 12,
      backoffMin: 250,
      backoffMax: 5_000,
    });
    await client.createAccount({
      termsOfServiceAgreed: true,
      ...(acme.email ? { contact: [`mailto:${acme.email}`] } : {}),
    });
    this.status.account_url = client.getAccountUrl();
    this.logger.info({ event: "acme_account_ready", account_url: this.status.account_url });
    this.client = client;
    return client;
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    if (this.timer) clearTimeout(this.timer);
    // setTimeout takes at most 2^31-1 ms (24.8 days); a later renewal is checked again then.
    this.timer = setTimeout(() => void this.check(), Math.max(0, Math.min(ms, 2 ** 31 - 1)));
    this.timer.unref();
  }

  /** Waits `ms`, or less when stop() comes first. */
  private sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.wake = resolve;
      this.timer = setTimeout(resolve, Math.max(0, ms));
    });
  }

  /** Stops scheduling; an order under way finishes (its files are still written) before this resolves. */
  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.wake?.();
    await this.running;
  }
}
