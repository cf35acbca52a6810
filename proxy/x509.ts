// X.509 for all of ashmesh: the sidecar, the development CA and the command line read
// certificates, keys and CRLs through this one module. PEM splitting, names (SANs, the RFC 2253
// subject, the CN), serials, extended key usage, signature and key strength, chains and CRLs.
// Node's X509Certificate reads certificates; @peculiar/x509 reads what Node does not expose (CRLs,
// key usage bits, writing certificates) and is loaded on first use, with its crypto provider set
// once, so that a sidecar without a CRL never pays the ~100 ms it takes to load.
import { createHash, type KeyObject, webcrypto, type X509Certificate } from "node:crypto";

export type Peculiar = typeof import("@peculiar/x509");

/** Extended key usage OIDs by name, and names by OID (for people). */
export const EKU = {
  serverAuth: "1.3.6.1.5.5.7.3.1",
  clientAuth: "1.3.6.1.5.5.7.3.2",
  codeSigning: "1.3.6.1.5.5.7.3.3",
  emailProtection: "1.3.6.1.5.5.7.3.4",
  timeStamping: "1.3.6.1.5.5.7.3.8",
  OCSPSigning: "1.3.6.1.5.5.7.3.9",
} as const;
export const EKU_NAMES: Readonly<Record<string, string>> = Object.fromEntries(
  Object.entries(EKU).map(([name, oid]) => [oid, name]),
);

export interface PemBlock {
  label: string;
  /** The whole block, BEGIN and END lines included. */
  text: string;
  der: Buffer;
}

const PEM_BLOCK = /-----BEGIN ([A-Z0-9 ]+)-----([\s\S]+?)-----END \1-----/g;

/** Every PEM block of `text` (of one label when given), in order. */
export function pemBlocks(text: string, label?: string): PemBlock[] {
  const out: PemBlock[] = [];
  for (const m of text.matchAll(PEM_BLOCK)) {
    if (label !== undefined && m[1] !== label) continue;
    // RFC 1421 headers ("Proc-Type: ...") are not base64.
    const body = (m[2] as string).replace(/^[A-Za-z-]+:.*$/gm, "");
    out.push({ label: m[1] as string, text: m[0], der: Buffer.from(body, "base64") });
  }
  return out;
}

/** Splits Node's subjectAltName text ("DNS:a, URI:b, IP Address:c"; values with commas JSON-quoted). */
export function parseSubjectAltName(text: string | undefined): Array<{ type: string; value: string }> {
  const out: Array<{ type: string; value: string }> = [];
  if (!text) return out;
  const entry = /\s*([A-Za-z ]+):("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)/y;
  let match: RegExpExecArray | null = entry.exec(text);
  while (match && match[0] !== "") {
    const raw = match[2] ?? "";
    out.push({ type: match[1] ?? "", value: raw.startsWith('"') ? (JSON.parse(raw) as string) : raw });
    match = entry.exec(text);
  }
  return out;
}

/** DNS and URI SANs of a certificate: DNS names lower-cased, URIs as written. */
export function subjectAltNames(cert: X509Certificate): { dns: string[]; uris: string[]; any: boolean } {
  const sans = parseSubjectAltName(cert.subjectAltName);
  return {
    dns: sans.filter((s) => s.type === "DNS").map((s) => s.value.toLowerCase()),
    uris: sans.filter((s) => s.type === "URI").map((s) => s.value),
    any: sans.length > 0,
  };
}

/** Escapes an attribute value as RFC 2253 §2.4 asks. */
function escapeValue(value: string): string {
  return value
    .replace(/([,+"\\<>;])/g, "\\$1")
    .replace(/^([ #])/, "\\$1")
    .replace(/ $/, "\\ ");
}

/** Node's multi-line name ("C=US\nO=x\nCN=y") as RFC 2253 ("CN=y,O=x,C=US"), values escaped. */
export function rfc2253(nodeName: string): string {
  return nodeName
    .split("\n")
    .filter(Boolean)
    .reverse()
    .map((rdn) => {
      const eq = rdn.indexOf("=");
      return eq === -1 ? escapeValue(rdn) : `${rdn.slice(0, eq)}=${escapeValue(rdn.slice(eq + 1))}`;
    })
    .join(",");
}

export const subjectOf = (cert: X509Certificate): string => rfc2253(cert.subject);
export const issuerOf = (cert: X509Certificate): string => rfc2253(cert.issuer);

/** The subject's common name, or null. */
export function commonName(cert: X509Certificate): string | null {
  const line = cert.subject.split("\n").find((l) => l.startsWith("CN="));
  return line ? line.slice(3) : null;
}

/**
 * A serial as a user or a tool may write it: any case, with colons or spaces (`openssl x509
 * -text`), a `serial=` prefix (`openssl x509 -serial`) or 0x; returned as lower-case hex without
 * leading zeros, the one form ashmesh compares and prints.
 */
export function normalizeSerial(text: string): string {
  return text
    .trim()
    .replace(/^serial\s*=\s*/i, "")
    .replace(/^0x/i, "")
    .replace(/[\s:]/g, "")
    .toLowerCase()
    .replace(/^0+(?=.)/, "");
}

export const serialOf = (cert: X509Certificate): string => normalizeSerial(cert.serialNumber);

/** Lower-case hex SHA-256 of the DER certificate (XFCC's Hash, /status). */
export const sha256Of = (cert: X509Certificate): string => cert.fingerprint256.replaceAll(":", "").toLowerCase();

/** The SPKI pin of a public key, as curl's --pinnedpubkey writes it: "sha256//<base64>". */
export function spkiPin(key: KeyObject): string {
  return `sha256//${createHash("sha256")
    .update(key.export({ type: "spki", format: "der" }))
    .digest("base64")}`;
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

const CURVES: Record<string, string> = { prime256v1: "P-256", secp384r1: "P-384", secp521r1: "P-521" };
/** Smallest key sizes ashmesh takes, for its own certificates and for peers alike (NIST SP 800-57). */
export const MIN_RSA_BITS = 2048;
export const MIN_EC_BITS = 256;
const EC_BITS: Record<string, number> = {
  prime256v1: 256,
  secp384r1: 384,
  secp521r1: 521,
  secp256k1: 256,
  brainpoolP256r1: 256,
  brainpoolP384r1: 384,
  brainpoolP512r1: 512,
};

/** A key as people name it: "ECDSA P-256", "RSA 2048 bits", "ed25519". */
export function keyDescription(key: KeyObject): string {
  const d = key.asymmetricKeyDetails ?? {};
  switch (key.asymmetricKeyType) {
    case "ec":
      return `ECDSA ${CURVES[d.namedCurve ?? ""] ?? d.namedCurve ?? ""}`.trim();
    case "rsa":
    case "rsa-pss":
      return `RSA ${d.modulusLength ?? "?"} bits`;
    default:
      return String(key.asymmetricKeyType);
  }
}

/** Why a (public or private) key is too weak for the mesh, or null: RSA below 2048 bits, EC below 256. */
export function weakKey(key: KeyObject): string | null {
  const d = key.asymmetricKeyDetails ?? {};
  switch (key.asymmetricKeyType) {
    case "rsa":
    case "rsa-pss":
    case "dsa":
      return (d.modulusLength ?? 0) < MIN_RSA_BITS
        ? `${keyDescription(key)} is below the ${MIN_RSA_BITS}-bit minimum`
        : null;
    case "ec": {
      const bits = EC_BITS[d.namedCurve ?? ""] ?? 0;
      return bits < MIN_EC_BITS
        ? `EC curve ${d.namedCurve ?? "unknown"} is below the ${MIN_EC_BITS}-bit minimum`
        : null;
    }
    default:
      return null; // ed25519, ed448: strong
  }
}

/** True when `ca`'s key signed `cert` and `ca`'s subject is `cert`'s issuer. */
export function issuedBy(cert: X509Certificate, ca: X509Certificate): boolean {
  return cert.checkIssued(ca) && cert.verify(ca.publicKey);
}

export function selfSigned(cert: X509Certificate): boolean {
  return issuedBy(cert, cert);
}

/** Finds the CA in `bundle` that `cert` chains to, through `intermediates`; null when none. */
export function chainToCa(
  cert: X509Certificate,
  intermediates: readonly X509Certificate[],
  bundle: readonly X509Certificate[],
): X509Certificate | null {
  let current = cert;
  for (let depth = 0; depth < 6; depth++) {
    const anchor = bundle.find((ca) => issuedBy(current, ca));
    if (anchor) return anchor;
    const next = intermediates.find((i) => i !== current && issuedBy(current, i));
    if (!next) return null;
    current = next;
  }
  return null;
}

let peculiarLoaded: Promise<Peculiar> | null = null;

/** @peculiar/x509, loaded once, with Node's WebCrypto as its provider. */
export function peculiar(): Promise<Peculiar> {
  peculiarLoaded ??= (async () => {
    await import("reflect-metadata"); // tsyringe, inside @peculiar/x509, needs it first
    const x509 = await import("@peculiar/x509");
    x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);
    return x509;
  })();
  return peculiarLoaded;
}

/** A peculiar Name (a CRL's issuer) as RFC 2253, like rfc2253() does for Node's names. */
export function nameToRfc2253(name: import("@peculiar/x509").Name): string {
  return name
    .toJSON()
    .map((rdn) =>
      Object.entries(rdn)
        .map(([type, values]) => values.map((v) => `${type}=${escapeValue(v)}`).join("+"))
        .join("+"),
    )
    .reverse()
    .join(",");
}

export interface Crl {
  /** RFC 2253, as the CA's subject reads. */
  issuer: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
  /** Normalized serials (see normalizeSerial). */
  revoked: Set<string>;
  /** The parsed list, for what else a caller wants to read (entries, extensions). */
  raw: import("@peculiar/x509").X509Crl;
}

/** One CRL, from a PEM block or DER. */
export async function parseCrl(data: string | Buffer): Promise<Crl> {
  const x509 = await peculiar();
  const crl = new x509.X509Crl(typeof data === "string" ? data : new Uint8Array(data));
  return {
    issuer: nameToRfc2253(crl.issuerName),
    thisUpdate: crl.thisUpdate,
    nextUpdate: crl.nextUpdate ?? null,
    revoked: new Set(crl.entries.map((e) => normalizeSerial(e.serialNumber))),
    raw: crl,
  };
}

/** Whether `ca`'s key signed the CRL (false for a CA of another key type). */
export async function crlSignedBy(crl: Crl, ca: X509Certificate): Promise<boolean> {
  const x509 = await peculiar();
  try {
    return await crl.raw.verify({ publicKey: new x509.X509Certificate(new Uint8Array(ca.raw)) });
  } catch {
    return false;
  }
}

/** The CA of `bundle` whose key signed the CRL, or null. */
export async function crlSigner(crl: Crl, bundle: readonly X509Certificate[]): Promise<X509Certificate | null> {
  for (const ca of bundle) if (await crlSignedBy(crl, ca)) return ca;
  return null;
}

/**
 * The http(s) URLs of a certificate's CRL distribution points (RFC 5280 §4.2.1.13), where its
 * issuer publishes the CRL that covers it. LDAP and other schemes are left out.
 */
export async function crlDistributionPoints(cert: X509Certificate): Promise<string[]> {
  const x509 = await peculiar();
  const parsed = new x509.X509Certificate(new Uint8Array(cert.raw));
  const extension = parsed.getExtension(x509.CRLDistributionPointsExtension);
  const urls: string[] = [];
  for (const point of extension?.distributionPoints ?? []) {
    for (const name of point.distributionPoint?.fullName ?? []) {
      const uri = name.uniformResourceIdentifier;
      if (uri && /^https?:\/\//i.test(uri)) urls.push(uri);
    }
  }
  return urls;
}

/**
 * Whether OpenSSL takes a CRL signed by `ca`: a CA with a key usage extension must list cRLSign
 * (RFC 5280 §4.2.1.3), or every CRL it signs fails (X509_V_ERR_KEYUSAGE_NO_CRL_SIGN), and with
 * CRL checks on, so does every peer of that CA. Node does not expose the bits; @peculiar does.
 */
export async function allowsCrlSigning(ca: X509Certificate): Promise<boolean> {
  const x509 = await peculiar();
  const usage = new x509.X509Certificate(new Uint8Array(ca.raw)).getExtension(x509.KeyUsagesExtension);
  return !usage || (usage.usages & x509.KeyUsageFlags.cRLSign) !== 0;
}
