// What the sidecar's identity is and how it is validated: certificate, key, CA bundle and CRL,
// read from files and checked as a whole before anything uses them. identity-store.ts holds the
// identity in use and swaps in a new one only once it passed this validation.
import { createHash, createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { type PeerIdentity, peerIdentity } from "./policy.js";
import {
  allowsCrlSigning,
  chainToCa,
  crlSigner,
  EKU,
  issuerOf,
  normalizeSerial,
  parseCrl,
  pemBlocks,
  serialOf,
  sha256Of,
  subjectOf,
  weakKey,
  weakSignature,
} from "./x509.js";

const DAY_MS = 86_400_000;

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

/** One rule of the validator, applied to one file: passed (ok), worth a warning, or fatal (error). */
export interface Finding {
  level: "ok" | "warning" | "error";
  field: IdentityField;
  file: string;
  message: string;
  /** What to do about it. */
  hint?: string;
}

/** What the validator found, in the order it checked; `ashmesh check` prints every one. */
class Findings {
  readonly list: Finding[] = [];
  ok(field: IdentityField, file: string, message: string): void {
    this.list.push({ level: "ok", field, file, message });
  }
  warn(field: IdentityField, file: string, message: string, hint?: string): void {
    this.list.push({ level: "warning", field, file, message, ...(hint ? { hint } : {}) });
  }
  error(field: IdentityField, file: string, message: string, hint?: string): void {
    this.list.push({ level: "error", field, file, message, ...(hint ? { hint } : {}) });
  }
  get failed(): boolean {
    return this.list.some((f) => f.level === "error");
  }
}

/** A finding as one line of text: the warnings the sidecar logs, the errors it refuses with. */
export function findingText(f: Finding): string {
  return `${f.field} (${f.file}): ${f.message}${f.hint ? `; ${f.hint}` : ""}`;
}

function readFile(findings: Findings, field: IdentityField, file: string): Buffer | null {
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
    findings.error(field, file, `cannot read: ${reason}`);
    return null;
  }
}

export function summarize(cert: X509Certificate): CertSummary {
  const peer = peerIdentity(cert);
  return {
    subject: peer.subject,
    identity: peer.primary,
    dns: peer.dns,
    uris: peer.uris,
    issuer: issuerOf(cert),
    serial: peer.serial,
    notBefore: new Date(cert.validFrom),
    notAfter: new Date(cert.validTo),
    sha256: peer.sha256,
  };
}

/** The certificates of a PEM file, in order; null (and an error found) when there is none or one does not parse. */
function parseCertificates(
  findings: Findings,
  field: IdentityField,
  file: string,
  pem: Buffer,
): X509Certificate[] | null {
  const blocks = pemBlocks(pem.toString("latin1"), "CERTIFICATE");
  if (blocks.length === 0) {
    findings.error(field, file, "no PEM certificate (-----BEGIN CERTIFICATE-----) in the file");
    return null;
  }
  const certs: X509Certificate[] = [];
  for (const [i, block] of blocks.entries()) {
    try {
      certs.push(new X509Certificate(block.der));
    } catch (err) {
      findings.error(field, file, `certificate #${i + 1} does not parse: ${(err as Error).message}`);
      return null;
    }
  }
  return certs;
}

function parseKey(findings: Findings, field: IdentityField, file: string, pem: Buffer): KeyObject | null {
  try {
    return createPrivateKey(pem);
  } catch (err) {
    findings.error(field, file, `not a readable private key (PEM, unencrypted): ${(err as Error).message}`);
    return null;
  }
}

const EKU_NAME = { server: "serverAuth", client: "clientAuth" } as const;

/** Checks one certificate and key (server or client); the Leaf when nothing about them is fatal. */
function checkLeaf(
  findings: Findings,
  roles: ReadonlyArray<"server" | "client">,
  paths: { cert: string; key: string },
  fields: { cert: IdentityField; key: IdentityField },
  pems: { certPem: Buffer; keyPem: Buffer },
  bundle: readonly X509Certificate[],
  dnsName: string,
  now: Date,
): Leaf | null {
  const errorsBefore = findings.list.filter((f) => f.level === "error").length;
  const { certPem, keyPem } = pems;
  const chain = parseCertificates(findings, fields.cert, paths.cert, certPem);
  const key = parseKey(findings, fields.key, paths.key, keyPem);
  if (!chain) return null;
  const leaf = chain[0] as X509Certificate;
  findings.ok(fields.cert, paths.cert, `${fields.cert} readable: ${subjectOf(leaf)}, serial ${serialOf(leaf)}`);
  if (key) {
    if (leaf.checkPrivateKey(key)) findings.ok(fields.key, paths.key, "key matches the certificate");
    else findings.error(fields.key, paths.key, `the key does not match the certificate in ${paths.cert}`);
  }
  const notBefore = new Date(leaf.validFrom);
  const notAfter = new Date(leaf.validTo);
  if (now < notBefore) findings.error(fields.cert, paths.cert, `not valid before ${notBefore.toISOString()}`);
  else if (now > notAfter) findings.error(fields.cert, paths.cert, `expired on ${notAfter.toISOString()}`);
  if (chainToCa(leaf, chain.slice(1), bundle))
    findings.ok(fields.cert, paths.cert, "certificate chains to a CA in tls.ca");
  else {
    findings.error(
      fields.cert,
      paths.cert,
      `does not chain to any CA in tls.ca (issuer: ${issuerOf(leaf)})`,
      `openssl verify -CAfile <tls.ca> ${paths.cert}`,
    );
  }
  // What peers refuse in a certificate (tls.ts), the sidecar refuses in its own.
  if (leaf.ca) {
    findings.error(
      fields.cert,
      paths.cert,
      "is a CA certificate (basicConstraints CA:TRUE): a sidecar's certificate must be a leaf, and peers refuse a CA",
      "issue a leaf certificate for the service (ashmesh certs issue NAME)",
    );
  }
  const weakPublicKey = weakKey(leaf.publicKey);
  if (weakPublicKey) {
    findings.error(
      fields.cert,
      paths.cert,
      `its key is too weak (${weakPublicKey}): peers refuse it`,
      "reissue with ECDSA P-256 or RSA 2048+",
    );
  }
  for (const cert of chain) {
    const weak = weakSignature(cert);
    if (weak) {
      const which = cert === leaf ? "the certificate" : `the intermediate ${subjectOf(cert)}`;
      findings.error(
        fields.cert,
        paths.cert,
        `${which} is signed with ${weak}, which TLS peers refuse: reissue it with SHA-256`,
      );
    }
  }
  const eku = leaf.keyUsage; // Node names the extended key usage OIDs "keyUsage"
  const missing = roles.filter((role) => eku && eku.length > 0 && !eku.includes(EKU[EKU_NAME[role]]));
  if (missing.length === 0)
    findings.ok(fields.cert, paths.cert, `EKU allows ${roles.map((r) => EKU_NAME[r]).join(" and ")}`);
  else {
    const both = roles.length > 1 && missing.includes("client");
    findings.error(
      fields.cert,
      paths.cert,
      `extended key usage does not allow TLS ${missing.join(" and ")} authentication (${missing.map((r) => EKU_NAME[r]).join(", ")})${both ? ", which outbound needs; set tls.clientCert or reissue with both" : ""}`,
      "reissue with extendedKeyUsage=serverAuth,clientAuth",
    );
  }
  const peer = peerIdentity(leaf);
  if (peer.dns.includes(dnsName.toLowerCase()))
    findings.ok(fields.cert, paths.cert, `SAN includes service.dnsName ${dnsName}`);
  else {
    const message = `no DNS SAN for service.dnsName ${dnsName} (the certificate names: ${peer.names.join(", ") || "nothing"})`;
    if (roles.includes("server")) findings.error(fields.cert, paths.cert, message, `ashmesh certs issue ${dnsName}`);
    else findings.warn(fields.cert, paths.cert, message, "peers will see another identity");
  }
  checkKeyMode(findings, fields.key, paths.key);
  const errorsAfter = findings.list.filter((f) => f.level === "error").length;
  return errorsAfter === errorsBefore ? { chain, certPem, keyPem, summary: summarize(leaf), peer } : null;
}

function checkKeyMode(findings: Findings, field: IdentityField, file: string): void {
  let mode: number;
  try {
    mode = statSync(file).mode & 0o777;
  } catch {
    return; // Read a moment ago (or given as PEM in use); a stat failure here changes nothing.
  }
  const shown = mode.toString(8).padStart(4, "0");
  if (mode & 0o077) {
    findings.warn(field, file, `the private key is readable by group or others (mode ${shown})`, "run chmod 600");
  } else findings.ok(field, file, `key ${file} is private (mode ${shown})`);
}

async function parseCrls(
  findings: Findings,
  file: string,
  pem: Buffer,
  bundle: readonly X509Certificate[],
  now: Date,
): Promise<ParsedCrl[]> {
  const text = pem.toString("latin1");
  const blocks = pemBlocks(text, "X509 CRL");
  if (blocks.length === 0) {
    const hint = text.includes("-----BEGIN CRL-----")
      ? " (the label is CRL; OpenSSL and Node read only -----BEGIN X509 CRL-----)"
      : "";
    findings.error("tls.crl", file, `no PEM CRL (-----BEGIN X509 CRL-----) in the file${hint}`);
    return [];
  }
  const lists: ParsedCrl[] = [];
  for (const [i, block] of blocks.entries()) {
    let crl: Awaited<ReturnType<typeof parseCrl>>;
    try {
      crl = await parseCrl(block.der);
    } catch (err) {
      findings.error("tls.crl", file, `CRL #${i + 1} does not parse: ${(err as Error).message}`);
      continue;
    }
    const issuerCa = await crlSigner(crl, bundle);
    if (!issuerCa) {
      // Harmless (no peer of that CA is trusted), and normal for a moment while a CA roll
      // rewrites the bundle and the CRL file one after the other.
      findings.warn("tls.crl", file, `CRL #${i + 1} (issuer ${crl.issuer}) is not signed by any CA in tls.ca: ignored`);
      continue;
    }
    if (!(await allowsCrlSigning(issuerCa))) {
      findings.error(
        "tls.crl",
        file,
        `CRL #${i + 1} is signed by "${subjectOf(issuerCa)}", whose key usage does not include cRLSign: OpenSSL refuses the CRL, and then every peer of that CA`,
        "the CA certificate must allow CRL signing (keyUsage cRLSign)",
      );
      continue;
    }
    if (crl.nextUpdate && crl.nextUpdate < now) {
      findings.error(
        "tls.crl",
        file,
        `CRL #${i + 1} (issuer ${crl.issuer}) is past its nextUpdate (${crl.nextUpdate.toISOString()}): publish a fresh CRL`,
        "ashmesh certs renew (re-signs the CRL)",
      );
      continue;
    }
    const days = crl.nextUpdate
      ? `next update in ${Math.floor((crl.nextUpdate.getTime() - now.getTime()) / DAY_MS)} days`
      : "no next update";
    findings.ok("tls.crl", file, `CRL of ${subjectOf(issuerCa)} is fresh (${days}, ${crl.revoked.size} revoked)`);
    lists.push({
      issuer: subjectOf(issuerCa),
      caSha256: sha256Of(issuerCa),
      thisUpdate: crl.thisUpdate,
      nextUpdate: crl.nextUpdate,
      revoked: crl.revoked,
    });
  }
  // OpenSSL checks revocation at every level once any CRL is set: a CA without one refuses all its peers.
  for (const ca of bundle) {
    if (!lists.some((l) => l.caSha256 === sha256Of(ca)) && !findings.failed) {
      findings.error(
        "tls.crl",
        file,
        `no CRL for CA "${subjectOf(ca)}" in tls.ca: every peer of that CA would be refused (UNABLE_TO_GET_CRL); add its CRL to the file`,
      );
    }
  }
  return lists;
}

/**
 * A CRL file's content checked against a CA bundle exactly as a reload would check it (signed by a
 * CA of the bundle, not past its nextUpdate, one for every CA): what the CRL fetcher runs before it
 * writes tls.crl, so that a list the sidecar would refuse is never written.
 */
export async function validateCrls(
  files: { ca: string; crl: string },
  caPem: Buffer,
  crlPem: Buffer,
  now = new Date(),
): Promise<{ lists: ParsedCrl[]; findings: Finding[]; failed: boolean }> {
  const findings = new Findings();
  const bundle = parseCertificates(findings, "tls.ca", files.ca, caPem);
  const lists = bundle ? await parseCrls(findings, files.crl, crlPem, bundle, now) : [];
  return { lists, findings: findings.list, failed: findings.failed };
}

export function isRevoked(identity: Pick<Identity, "crl">, serial: string): boolean {
  if (!identity.crl) return false;
  const normalized = normalizeSerial(serial);
  return identity.crl.lists.some((l) => l.revoked.has(normalized));
}

/** PEM material already in use, validated again instead of read from the files. */
export interface Reuse {
  trust?: { caPem: Buffer; crlPem: Buffer | null };
  leaves?: { server: { certPem: Buffer; keyPem: Buffer }; client: { certPem: Buffer; keyPem: Buffer } };
}

export interface IdentityOptions {
  dnsName: string;
  now?: Date;
  version?: number;
  reuse?: Reuse;
}

/**
 * Reads every file (or reuses material in use, see Reuse) and applies every rule, recording what
 * passed, what is worth a warning and what is fatal; the identity when nothing is fatal.
 */
export async function validateIdentity(
  paths: IdentityPaths,
  options: IdentityOptions,
): Promise<{ identity: Identity | null; findings: Finding[] }> {
  const now = options.now ?? new Date();
  const findings = new Findings();
  const done = (identity: Identity | null = null) => ({ identity, findings: findings.list });
  const reuse = options.reuse ?? {};
  const caPem = reuse.trust?.caPem ?? readFile(findings, "tls.ca", paths.ca);
  const caCerts = caPem && parseCertificates(findings, "tls.ca", paths.ca, caPem);
  if (!caPem || !caCerts) return done();
  for (const ca of caCerts) {
    if (!ca.ca) findings.error("tls.ca", paths.ca, `"${subjectOf(ca)}" is not a CA certificate`);
    else if (now > new Date(ca.validTo))
      findings.warn("tls.ca", paths.ca, `CA "${subjectOf(ca)}" expired on ${ca.validTo}`);
  }
  if (findings.failed) return done();
  findings.ok("tls.ca", paths.ca, `tls.ca: ${caCerts.map(subjectOf).join(" + ")}`);

  const sameClient = paths.clientCert === paths.cert && paths.clientKey === paths.key;
  const leafPems = (certField: IdentityField, cert: string, keyField: IdentityField, key: string) => {
    const certPem = readFile(findings, certField, cert);
    const keyPem = readFile(findings, keyField, key);
    return certPem && keyPem ? { certPem, keyPem } : null;
  };
  const serverPems = reuse.leaves?.server ?? leafPems("tls.cert", paths.cert, "tls.key", paths.key);
  const server =
    serverPems &&
    checkLeaf(
      findings,
      sameClient ? ["server", "client"] : ["server"],
      paths,
      { cert: "tls.cert", key: "tls.key" },
      serverPems,
      caCerts,
      options.dnsName,
      now,
    );
  let client = server;
  if (!sameClient) {
    const clientPems =
      reuse.leaves?.client ?? leafPems("tls.clientCert", paths.clientCert, "tls.clientKey", paths.clientKey);
    client =
      clientPems &&
      checkLeaf(
        findings,
        ["client"],
        { cert: paths.clientCert, key: paths.clientKey },
        { cert: "tls.clientCert", key: "tls.clientKey" },
        clientPems,
        caCerts,
        options.dnsName,
        now,
      );
  }

  let crl: Identity["crl"] = null;
  if (paths.crl) {
    const pem = reuse.trust ? reuse.trust.crlPem : readFile(findings, "tls.crl", paths.crl);
    if (pem) crl = { pem, lists: await parseCrls(findings, paths.crl, pem, caCerts, now) };
  }
  const own: Array<{ role: string; leaf: Leaf | null; field: IdentityField; file: string }> = [
    { role: "server", leaf: server, field: "tls.cert", file: paths.cert },
  ];
  if (!sameClient) own.push({ role: "client", leaf: client, field: "tls.clientCert", file: paths.clientCert });
  for (const { role, leaf, field, file } of own) {
    if (leaf && isRevoked({ crl }, leaf.summary.serial)) {
      findings.warn(
        field,
        file,
        `our own ${role} certificate (serial ${leaf.summary.serial}) is revoked by the CRL: peers will refuse it`,
        "ashmesh certs rotate",
      );
    }
  }
  if (findings.failed || !server || !client) return done();
  const trustHash = createHash("sha256")
    .update(caPem)
    .update("\0")
    .update(crl?.pem ?? "")
    .digest("hex");
  return done({
    version: options.version ?? 1,
    loadedAt: now,
    server,
    client,
    ca: { pem: caPem, certs: caCerts, summaries: caCerts.map(summarize) },
    crl,
    trustHash,
    warnings: findings.list.filter((f) => f.level === "warning").map(findingText),
  });
}

/** The identity of `paths` when every rule holds; otherwise an IdentityError naming the first fatal finding. */
export async function loadIdentity(paths: IdentityPaths, options: IdentityOptions): Promise<Identity> {
  const { identity, findings } = await validateIdentity(paths, options);
  if (identity) return identity;
  const first = findings.find((f) => f.level === "error");
  if (!first) throw new Error("identity validation failed without a finding"); // unreachable by construction
  throw new IdentityError(first.field, first.file, first.message);
}

/** How long before expiry a certificate is reported (log, `ashmesh check`). */
export const EXPIRY_WARNING_DAYS = 30;
/** How long before its nextUpdate a CRL is reported: past it, every peer of its CA is refused. */
export const CRL_WARNING_DAYS = 1;

/** Something about a valid identity an operator must act on soon, as the sidecar logs it and `check` shows it. */
export type Notice = { message: string; hint: string } & (
  | { event: "cert_expiring"; subject: string; serial: string; daysLeft: number; notAfter: Date }
  | { event: "crl_expiring" | "crl_expired"; issuer: string; nextUpdate: Date }
);

/**
 * Warnings about a valid identity. With `acme` (the manager renews at `renewAt` of the lifetime),
 * a short lifetime is normal (step-ca issues 24-hour certificates): a certificate is reported as
 * expiring only once half of its renewal window has passed without a renewal — with the default
 * 0.7, under 15 % of its lifetime left, the threshold of the expiry alerts for ACME sidecars.
 */
export function identityNotices(identity: Identity, now = new Date(), acme?: { renewAt: number }): Notice[] {
  const notices: Notice[] = [];
  // A CRL past its nextUpdate makes OpenSSL refuse every peer of its CA (crl_expired): say so
  // ahead, and loudly once it happened, rather than trusting an old list forever.
  for (const crl of identity.crl?.lists ?? []) {
    if (!crl.nextUpdate) continue;
    const days = (crl.nextUpdate.getTime() - now.getTime()) / DAY_MS;
    if (days >= CRL_WARNING_DAYS) continue;
    notices.push({
      event: days < 0 ? "crl_expired" : "crl_expiring",
      issuer: crl.issuer,
      nextUpdate: crl.nextUpdate,
      message:
        days < 0
          ? `the CRL of ${crl.issuer} is past its nextUpdate (${crl.nextUpdate.toISOString()}): every peer of this CA is refused`
          : `the CRL of ${crl.issuer} reaches its nextUpdate in ${days.toFixed(1)} days (${crl.nextUpdate.toISOString()})`,
      hint: "publish a fresh CRL (ashmesh certs renew re-signs the dev CA's)",
    });
  }
  for (const leaf of new Set([identity.server, identity.client])) {
    const s = leaf.summary;
    const days = (s.notAfter.getTime() - now.getTime()) / DAY_MS;
    if (acme) {
      const left = (s.notAfter.getTime() - now.getTime()) / (s.notAfter.getTime() - s.notBefore.getTime());
      if (left >= (1 - acme.renewAt) / 2) continue;
    } else if (days >= EXPIRY_WARNING_DAYS) continue;
    notices.push({
      event: "cert_expiring",
      subject: s.subject,
      serial: s.serial,
      daysLeft: Math.floor(days),
      notAfter: s.notAfter,
      message: `certificate ${s.subject} expires in ${Math.floor(days)} days (${s.notAfter.toISOString().slice(0, 10)})`,
      hint: "ashmesh certs renew",
    });
  }
  return notices;
}

/** Every file the identity depends on, for the watcher. */
export function identityFiles(paths: IdentityPaths): string[] {
  return [
    ...new Set(
      [paths.cert, paths.key, paths.ca, paths.clientCert, paths.clientKey, paths.crl].filter((p): p is string => !!p),
    ),
  ];
}
