// The sidecar's identity: certificate, key, CA bundle and CRL, read from files, validated as a
// whole and only then used. A reload that fails validation leaves the identity in use untouched
// ("if reloading failed, the old state is kept"); the watcher watches directories, not files, so
// rename-into-place and `..data` symlink swaps are seen.
import { createHash, createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { EventEmitter } from "node:events";
import { readFileSync, statSync } from "node:fs";
import { basename, dirname } from "node:path";
import type { FSWatcher } from "chokidar";
import { type PeerIdentity, peerIdentity, rfc2253 } from "./policy.js";

export interface IdentityPaths {
  cert: string;
  key: string;
  ca: string;
  clientCert: string;
  clientKey: string;
  crl: string | null;
}

/** A certificate as operators read it: /status, logs, the expiry gauge. */
export interface CertSummary {
  subject: string;
  identity: string;
  dns: string[];
  uris: string[];
  issuer: string;
  serial: string;
  notBefore: Date;
  notAfter: Date;
  sha256: string;
}

export interface ParsedCrl {
  /** The CA of tls.ca that signed it (RFC 2253) and that CA's fingerprint. */
  issuer: string;
  caSha256: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
  /** Lower-case hex serials without leading zeros. */
  revoked: Set<string>;
}

export interface Leaf {
  /** The leaf first, then any intermediates from the same file. */
  chain: X509Certificate[];
  certPem: Buffer;
  keyPem: Buffer;
  summary: CertSummary;
  peer: PeerIdentity;
}

export interface Identity {
  /** Increments with each identity taken into use. */
  version: number;
  loadedAt: Date;
  server: Leaf;
  client: Leaf;
  ca: { pem: Buffer; certs: X509Certificate[]; summaries: CertSummary[] };
  crl: { pem: Buffer; lists: ParsedCrl[] } | null;
  /** SHA-256 over the CA bundle and the CRL: when it changes, trust changed. */
  trustHash: string;
  /** Problems worth a warning that do not make the identity unusable. */
  warnings: string[];
}

/** Which configuration field a problem is about; the message names the field and the file. */
export type IdentityField = "tls.cert" | "tls.key" | "tls.ca" | "tls.clientCert" | "tls.clientKey" | "tls.crl";

export class IdentityError extends Error {
  readonly code = "ASHMESH_BAD_IDENTITY";
  constructor(
    readonly field: IdentityField,
    readonly file: string,
    readonly reason: string,
  ) {
    super(`${field} (${file}): ${reason}`);
    this.name = "IdentityError";
  }
}

const EKU_SERVER = "1.3.6.1.5.5.7.3.1";
const EKU_CLIENT = "1.3.6.1.5.5.7.3.2";
const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----[\s\S]+?-----END \1-----/g;

export function normalizeSerial(serial: string): string {
  return serial.toLowerCase().replace(/^0+(?=.)/, "");
}

export function pemBlocks(text: string, label: string): string[] {
  return [...text.matchAll(PEM_BLOCK)].filter((m) => m[1] === label).map((m) => m[0]);
}

function readFile(field: IdentityField, file: string): Buffer {
  try {
    return readFileSync(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    const reason =
      code === "ENOENT"
        ? "no such file"
        : code === "EACCES"
          ? "permission denied: the sidecar's user must be able to read it"
          : (err as Error).message;
    throw new IdentityError(field, file, `cannot read: ${reason}`);
  }
}

export function summarize(cert: X509Certificate): CertSummary {
  const peer = peerIdentity(cert);
  return {
    subject: peer.subject,
    identity: peer.primary,
    dns: peer.dns,
    uris: peer.uris,
    issuer: rfc2253(cert.issuer),
    serial: peer.serial,
    notBefore: new Date(cert.validFrom),
    notAfter: new Date(cert.validTo),
    sha256: peer.sha256,
  };
}

export function parseCertificates(field: IdentityField, file: string, pem: Buffer): X509Certificate[] {
  const blocks = pemBlocks(pem.toString("latin1"), "CERTIFICATE");
  if (blocks.length === 0)
    throw new IdentityError(field, file, "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file");
  return blocks.map((block, i) => {
    try {
      return new X509Certificate(block);
    } catch (err) {
      throw new IdentityError(field, file, `certificate #${i + 1} does not parse: ${(err as Error).message}`);
    }
  });
}

function parseKey(field: IdentityField, file: string, pem: Buffer): KeyObject {
  try {
    return createPrivateKey(pem);
  } catch (err) {
    throw new IdentityError(field, file, `not a readable private key (PEM, unencrypted): ${(err as Error).message}`);
  }
}

/** Finds the CA in `bundle` that `cert` chains to, through `intermediates`; null when none. */
export function chainToCa(
  cert: X509Certificate,
  intermediates: readonly X509Certificate[],
  bundle: readonly X509Certificate[],
): X509Certificate | null {
  let current = cert;
  for (let depth = 0; depth < 6; depth++) {
    const anchor = bundle.find((ca) => current.checkIssued(ca) && current.verify(ca.publicKey));
    if (anchor) return anchor;
    const next = intermediates.find((i) => i !== current && current.checkIssued(i) && current.verify(i.publicKey));
    if (!next) return null;
    current = next;
  }
  return null;
}

function checkLeaf(
  role: "server" | "client",
  paths: { cert: string; key: string },
  fields: { cert: IdentityField; key: IdentityField },
  pems: { certPem: Buffer; keyPem: Buffer },
  bundle: readonly X509Certificate[],
  dnsName: string,
  now: Date,
  warnings: string[],
): Leaf {
  const { certPem, keyPem } = pems;
  const chain = parseCertificates(fields.cert, paths.cert, certPem);
  const leaf = chain[0] as X509Certificate;
  const key = parseKey(fields.key, paths.key, keyPem);
  if (!leaf.checkPrivateKey(key)) {
    throw new IdentityError(fields.key, paths.key, `the key does not match the certificate in ${paths.cert}`);
  }
  const notBefore = new Date(leaf.validFrom);
  const notAfter = new Date(leaf.validTo);
  if (now < notBefore) throw new IdentityError(fields.cert, paths.cert, `not valid before ${notBefore.toISOString()}`);
  if (now > notAfter) throw new IdentityError(fields.cert, paths.cert, `expired on ${notAfter.toISOString()}`);
  if (!chainToCa(leaf, chain.slice(1), bundle)) {
    throw new IdentityError(
      fields.cert,
      paths.cert,
      `does not chain to any CA in tls.ca (issuer: ${rfc2253(leaf.issuer)})`,
    );
  }
  for (const cert of chain) {
    const weak = weakSignature(cert);
    if (weak) {
      const which = cert === leaf ? "the certificate" : `the intermediate ${rfc2253(cert.subject)}`;
      throw new IdentityError(
        fields.cert,
        paths.cert,
        `${which} is signed with ${weak}, which TLS peers refuse: reissue it with SHA-256`,
      );
    }
  }
  const eku = leaf.keyUsage; // Node names the extended key usage OIDs "keyUsage"
  const wanted = role === "server" ? EKU_SERVER : EKU_CLIENT;
  if (eku && eku.length > 0 && !eku.includes(wanted)) {
    throw new IdentityError(
      fields.cert,
      paths.cert,
      `extended key usage does not allow TLS ${role} authentication (${role === "server" ? "serverAuth" : "clientAuth"})`,
    );
  }
  const peer = peerIdentity(leaf);
  if (!peer.dns.includes(dnsName.toLowerCase())) {
    const message = `no DNS SAN for service.dnsName ${dnsName} (the certificate names: ${peer.names.join(", ") || "nothing"})`;
    if (role === "server") throw new IdentityError(fields.cert, paths.cert, message);
    warnings.push(`${fields.cert} (${paths.cert}): ${message}; peers will see another identity`);
  }
  return { chain, certPem, keyPem, summary: summarize(leaf), peer };
}

/** Signature algorithms OpenSSL 3 refuses at its default security level, by OID (DER bytes, hex). */
const WEAK_SIGNATURES = new Map([
  ["2a864886f70d010104", "MD5"], // md5WithRSAEncryption
  ["2a864886f70d010105", "SHA-1"], // sha1WithRSAEncryption
  ["2a8648ce3d0401", "SHA-1"], // ecdsa-with-SHA1
  ["2a8648ce380403", "SHA-1"], // dsa-with-sha1
]);

/**
 * The weak hash a certificate is signed with, or null. Node does not expose the signature
 * algorithm, so it is read from the DER: Certificate ::= SEQUENCE { tbsCertificate,
 * signatureAlgorithm SEQUENCE { OID, ... }, signature }.
 */
export function weakSignature(cert: X509Certificate): string | null {
  const der = cert.raw;
  const header = (at: number): { body: number; end: number } => {
    const first = der[at + 1] ?? 0;
    if (first < 0x80) return { body: at + 2, end: at + 2 + first };
    let length = 0;
    for (let i = 0; i < (first & 0x7f); i++) length = length * 256 + (der[at + 2 + i] ?? 0);
    return { body: at + 2 + (first & 0x7f), end: at + 2 + (first & 0x7f) + length };
  };
  const outer = header(0);
  const tbs = header(outer.body);
  const algorithm = header(tbs.end);
  const oid = header(algorithm.body);
  if (der[algorithm.body] !== 0x06) return null;
  return WEAK_SIGNATURES.get(der.subarray(oid.body, oid.end).toString("hex")) ?? null;
}

function checkKeyMode(field: IdentityField, file: string, warnings: string[]): void {
  try {
    const mode = statSync(file).mode & 0o777;
    if (mode & 0o077) {
      warnings.push(
        `${field} (${file}): the private key is readable by group or others (mode ${mode.toString(8).padStart(4, "0")}); run chmod 600`,
      );
    }
  } catch {
    // Already read successfully; a stat failure here changes nothing.
  }
}

async function parseCrls(
  file: string,
  pem: Buffer,
  bundle: readonly X509Certificate[],
  now: Date,
  warnings: string[],
): Promise<ParsedCrl[]> {
  const x509 = await import("./crl.js");
  const text = pem.toString("latin1");
  const blocks = pemBlocks(text, "X509 CRL");
  if (blocks.length === 0) {
    const hint = text.includes("-----BEGIN CRL-----")
      ? " (the label is CRL; OpenSSL and Node read only -----BEGIN X509 CRL-----)"
      : "";
    throw new IdentityError("tls.crl", file, `no PEM CRL (-----BEGIN X509 CRL-----) in the file${hint}`);
  }
  const lists: ParsedCrl[] = [];
  for (const [i, block] of blocks.entries()) {
    let crl: Awaited<ReturnType<typeof x509.parseCrl>>;
    try {
      crl = await x509.parseCrl(block);
    } catch (err) {
      throw new IdentityError("tls.crl", file, `CRL #${i + 1} does not parse: ${(err as Error).message}`);
    }
    const issuerCa = await x509.crlIssuer(crl, bundle);
    if (!issuerCa) {
      // Harmless (no peer of that CA is trusted), and normal for a moment while a CA roll
      // rewrites the bundle and the CRL file one after the other.
      warnings.push(
        `tls.crl (${file}): CRL #${i + 1} (issuer ${crl.issuer}) is not signed by any CA in tls.ca: ignored`,
      );
      continue;
    }
    if (crl.nextUpdate && crl.nextUpdate < now) {
      throw new IdentityError(
        "tls.crl",
        file,
        `CRL #${i + 1} (issuer ${crl.issuer}) is past its nextUpdate (${crl.nextUpdate.toISOString()}): publish a fresh CRL`,
      );
    }
    const ca = summarize(issuerCa);
    lists.push({
      issuer: ca.subject,
      caSha256: ca.sha256,
      thisUpdate: crl.thisUpdate,
      nextUpdate: crl.nextUpdate,
      revoked: crl.revoked,
    });
  }
  // OpenSSL checks revocation at every level once any CRL is set: a CA without one refuses all its peers.
  for (const ca of bundle.map(summarize)) {
    const name = ca.subject;
    if (!lists.some((l) => l.caSha256 === ca.sha256)) {
      throw new IdentityError(
        "tls.crl",
        file,
        `no CRL for CA "${name}" in tls.ca: every peer of that CA would be refused (UNABLE_TO_GET_CRL); add its CRL to the file`,
      );
    }
  }
  return lists;
}

export function isRevoked(identity: Identity, serial: string): boolean {
  if (!identity.crl) return false;
  const normalized = normalizeSerial(serial);
  return identity.crl.lists.some((l) => l.revoked.has(normalized));
}

/** PEM material already in use, validated again instead of read from the files. */
export interface Reuse {
  trust?: { caPem: Buffer; crlPem: Buffer | null };
  leaves?: { server: { certPem: Buffer; keyPem: Buffer }; client: { certPem: Buffer; keyPem: Buffer } };
}

/**
 * Reads and validates every file (or reuses material in use, see Reuse); throws an
 * IdentityError naming the field and file at fault.
 */
export async function loadIdentity(
  paths: IdentityPaths,
  options: { dnsName: string; now?: Date; version?: number; reuse?: Reuse },
): Promise<Identity> {
  const now = options.now ?? new Date();
  const warnings: string[] = [];
  const reuse = options.reuse ?? {};
  const caPem = reuse.trust?.caPem ?? readFile("tls.ca", paths.ca);
  const caCerts = parseCertificates("tls.ca", paths.ca, caPem);
  for (const ca of caCerts) {
    if (!ca.ca) {
      throw new IdentityError("tls.ca", paths.ca, `"${rfc2253(ca.subject)}" is not a CA certificate`);
    }
    if (now > new Date(ca.validTo)) {
      warnings.push(`tls.ca (${paths.ca}): CA "${rfc2253(ca.subject)}" expired on ${ca.validTo}`);
    }
  }
  const sameClient = paths.clientCert === paths.cert && paths.clientKey === paths.key;
  const serverPems = reuse.leaves?.server ?? {
    certPem: readFile("tls.cert", paths.cert),
    keyPem: readFile("tls.key", paths.key),
  };
  const server = checkLeaf(
    "server",
    paths,
    { cert: "tls.cert", key: "tls.key" },
    serverPems,
    caCerts,
    options.dnsName,
    now,
    warnings,
  );
  const client = sameClient
    ? server
    : checkLeaf(
        "client",
        { cert: paths.clientCert, key: paths.clientKey },
        { cert: "tls.clientCert", key: "tls.clientKey" },
        reuse.leaves?.client ?? {
          certPem: readFile("tls.clientCert", paths.clientCert),
          keyPem: readFile("tls.clientKey", paths.clientKey),
        },
        caCerts,
        options.dnsName,
        now,
        warnings,
      );
  if (sameClient) {
    const eku = server.chain[0]?.keyUsage;
    if (eku && eku.length > 0 && !eku.includes(EKU_CLIENT)) {
      throw new IdentityError(
        "tls.cert",
        paths.cert,
        "extended key usage does not allow TLS client authentication (clientAuth), which outbound needs; set tls.clientCert or reissue with both",
      );
    }
  }
  checkKeyMode("tls.key", paths.key, warnings);
  if (!sameClient) checkKeyMode("tls.clientKey", paths.clientKey, warnings);

  let crl: Identity["crl"] = null;
  if (paths.crl) {
    const pem = reuse.trust ? reuse.trust.crlPem : readFile("tls.crl", paths.crl);
    if (pem) crl = { pem, lists: await parseCrls(paths.crl, pem, caCerts, now, warnings) };
  }
  const trustHash = createHash("sha256")
    .update(caPem)
    .update("\0")
    .update(crl?.pem ?? "")
    .digest("hex");
  const identity: Identity = {
    version: options.version ?? 1,
    loadedAt: now,
    server,
    client,
    ca: { pem: caPem, certs: caCerts, summaries: caCerts.map(summarize) },
    crl,
    trustHash,
    warnings,
  };
  for (const [role, leaf] of sameClient
    ? ([["server", server]] as const)
    : ([
        ["server", server],
        ["client", client],
      ] as const)) {
    if (isRevoked(identity, leaf.summary.serial)) {
      warnings.push(
        `our own ${role} certificate (serial ${leaf.summary.serial}) is revoked by the CRL: peers will refuse it`,
      );
    }
  }
  return identity;
}

const LEAF_FIELDS = new Set<IdentityField>(["tls.cert", "tls.key", "tls.clientCert", "tls.clientKey"]);

/** Every file the identity depends on, for the watcher. */
export function identityFiles(paths: IdentityPaths): string[] {
  return [
    ...new Set(
      [paths.cert, paths.key, paths.ca, paths.clientCert, paths.clientKey, paths.crl].filter((p): p is string => !!p),
    ),
  ];
}

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
    private readonly usable: (next: Identity) => void = () => {},
    private readonly debounceMs = 75,
    private readonly settleMs = 400,
  ) {
    super();
  }

  /**
   * Loads and validates again; swaps only when the files changed and validate. With `settle`
   * (file events), a failure is retried once after settleMs before it is reported: a certificate
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
        await new Promise((resolve) => setTimeout(resolve, this.settleMs));
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
    }, this.debounceMs);
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.debounce) clearTimeout(this.debounce);
    await this.watcher?.close();
    this.watcher = null;
    await this.reloading;
  }
}
