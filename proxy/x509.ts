// X.509 for all of ashmesh: the sidecar, the development CA and the command line read
// certificates, keys and CRLs through this one module. PEM splitting, names (SANs, the RFC 2253
// subject, the CN), serials, extended key usage, signature and key strength, chains and CRLs.
// Node's X509Certificate reads certificates; @peculiar/x509 reads what Node does not expose (CRLs,
// key usage bits, writing certificates) and is loaded on first use, with its crypto provider set
// once, so that a sidecar without a CRL never pays the ~100 ms it takes to load.
import { constants, createHash, type KeyObject, verify, webcrypto, type X509Certificate } from "node:crypto";

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

/**
 * A small DER reader (ITU-T X.690): the CRL fields the sidecar needs and a certificate's key usage
 * are read here, without @peculiar/x509, which costs a sidecar ~100 ms of start and megabytes of
 * heap. @peculiar stays for writing certificates and for `certs inspect`.
 */
interface Tlv {
  tag: number;
  /** Offsets in the buffer: the first byte of the element, of its contents, and just past it. */
  start: number;
  body: number;
  end: number;
}

function tlv(der: Uint8Array, at: number): Tlv {
  const tag = der[at] ?? -1;
  const first = der[at + 1] ?? 0;
  let length = first;
  let body = at + 2;
  if (first & 0x80) {
    const bytes = first & 0x7f;
    if (bytes === 0 || bytes > 4) throw new Error("DER: unsupported length");
    length = 0;
    for (let i = 0; i < bytes; i++) length = length * 256 + (der[at + 2 + i] ?? 0);
    body = at + 2 + bytes;
  }
  const end = body + length;
  if (tag < 0 || end > der.length) throw new Error("DER: element runs past the end");
  return { tag, start: at, body, end };
}

function children(der: Uint8Array, parent: Tlv): Tlv[] {
  const out: Tlv[] = [];
  for (let at = parent.body; at < parent.end; ) {
    const child = tlv(der, at);
    out.push(child);
    at = child.end;
  }
  return out;
}

function oidOf(der: Uint8Array, t: Tlv): string {
  const bytes = der.subarray(t.body, t.end);
  const parts: number[] = [Math.floor((bytes[0] ?? 0) / 40), (bytes[0] ?? 0) % 40];
  let value = 0;
  for (const byte of bytes.subarray(1)) {
    value = value * 128 + (byte & 0x7f);
    if (!(byte & 0x80)) {
      parts.push(value);
      value = 0;
    }
  }
  return parts.join(".");
}

function timeOf(der: Uint8Array, t: Tlv): Date {
  const text = Buffer.from(der.subarray(t.body, t.end)).toString("latin1");
  // UTCTime YYMMDDHHMMSSZ (years 1950-2049), GeneralizedTime YYYYMMDDHHMMSSZ (RFC 5280 §4.1.2.5).
  const full = t.tag === 0x17 ? `${Number(text.slice(0, 2)) >= 50 ? "19" : "20"}${text}` : text;
  const m = /^(\d{4})(\d{2})(\d{2})(\d{2})(\d{2})(\d{2})Z$/.exec(full);
  if (!m) throw new Error(`DER: unsupported time ${text}`);
  return new Date(Date.UTC(+m[1]!, +m[2]! - 1, +m[3]!, +m[4]!, +m[5]!, +m[6]!));
}

const isTime = (t: Tlv | undefined) => t?.tag === 0x17 || t?.tag === 0x18;

/** Attribute types by OID, as RFC 4514 writes them. */
const NAME_TYPES: Record<string, string> = {
  "2.5.4.3": "CN",
  "2.5.4.6": "C",
  "2.5.4.7": "L",
  "2.5.4.8": "ST",
  "2.5.4.10": "O",
  "2.5.4.11": "OU",
  "0.9.2342.19200300.100.1.25": "DC",
  "1.2.840.113549.1.9.1": "emailAddress",
};

/** A DER Name as RFC 2253 (most specific first), as rfc2253() writes Node's names. */
function nameOf(der: Uint8Array, name: Tlv): string {
  const rdns = children(der, name).map((set) =>
    children(der, set)
      .map((atv) => {
        const [type, value] = children(der, atv);
        if (!type || !value) return "";
        const oid = oidOf(der, type);
        const raw = Buffer.from(der.subarray(value.body, value.end));
        const text = value.tag === 0x1e ? raw.swap16().toString("utf16le") : raw.toString("utf8");
        return `${NAME_TYPES[oid] ?? oid}=${escapeValue(text)}`;
      })
      .join("+"),
  );
  return rdns.reverse().join(",");
}

/** Signature algorithms by OID: the digest node:crypto verifies with (null: none, as for EdDSA). */
const SIGNATURE_DIGESTS: Record<string, string | null> = {
  "1.2.840.113549.1.1.11": "sha256", // sha256WithRSAEncryption
  "1.2.840.113549.1.1.12": "sha384",
  "1.2.840.113549.1.1.13": "sha512",
  "1.2.840.113549.1.1.14": "sha224",
  "1.2.840.10045.4.3.2": "sha256", // ecdsa-with-SHA256
  "1.2.840.10045.4.3.3": "sha384",
  "1.2.840.10045.4.3.4": "sha512",
  "1.3.101.112": null, // Ed25519
  "1.3.101.113": null, // Ed448
};

export interface Crl {
  /** RFC 2253, as the CA's subject reads. */
  issuer: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
  /** Normalized serials (see normalizeSerial). */
  revoked: Set<string>;
  /** What the signature covers, its algorithm (and RSASSA-PSS parameters) and the signature. */
  signed: { tbs: Buffer; algorithm: string; pss: { hash: string; saltLength: number } | null; signature: Buffer };
  /** The whole CRL, DER. */
  der: Buffer;
}

/** One CRL, from a PEM block or DER (RFC 5280 §5.1: CertificateList). */
export async function parseCrl(data: string | Buffer): Promise<Crl> {
  const der = typeof data === "string" ? (pemBlocks(data, "X509 CRL")[0]?.der ?? Buffer.alloc(0)) : data;
  const list = tlv(der, 0);
  const [tbs, algorithm, signature] = children(der, list);
  if (list.tag !== 0x30 || tbs?.tag !== 0x30 || algorithm?.tag !== 0x30 || signature?.tag !== 0x03) {
    throw new Error("not a DER CertificateList");
  }
  const fields = children(der, tbs);
  let i = fields[0]?.tag === 0x02 ? 1 : 0; // version, when present
  i++; // the signature algorithm again, inside what is signed
  const issuer = fields[i++];
  const thisUpdate = fields[i++];
  if (issuer?.tag !== 0x30 || !thisUpdate || !isTime(thisUpdate)) throw new Error("no issuer or thisUpdate");
  const nextUpdate = isTime(fields[i]) ? fields[i++] : undefined;
  const revoked = new Set<string>();
  const entries = fields[i]?.tag === 0x30 ? fields[i] : undefined;
  for (const entry of entries ? children(der, entries) : []) {
    const serial = children(der, entry)[0];
    if (serial?.tag === 0x02)
      revoked.add(normalizeSerial(Buffer.from(der.subarray(serial.body, serial.end)).toString("hex")));
  }
  const [algorithmOid, params] = children(der, algorithm);
  const algorithmName = algorithmOid ? oidOf(der, algorithmOid) : "";
  return {
    issuer: nameOf(der, issuer),
    thisUpdate: timeOf(der, thisUpdate),
    nextUpdate: nextUpdate ? timeOf(der, nextUpdate) : null,
    revoked,
    signed: {
      tbs: Buffer.from(der.subarray(tbs.start, tbs.end)),
      algorithm: algorithmName,
      pss: algorithmName === RSASSA_PSS && params ? pssParameters(der, params) : null,
      // BIT STRING: its first content byte counts unused bits (0 for signatures).
      signature: Buffer.from(der.subarray(signature.body + 1, signature.end)),
    },
    der: Buffer.from(der),
  };
}

const RSASSA_PSS = "1.2.840.113549.1.1.10";
const PSS_HASHES: Record<string, string> = {
  "1.3.14.3.2.26": "sha1",
  "2.16.840.1.101.3.4.2.1": "sha256",
  "2.16.840.1.101.3.4.2.2": "sha384",
  "2.16.840.1.101.3.4.2.3": "sha512",
};

/** RSASSA-PSS-params (RFC 4055 §3.1): [0] hashAlgorithm (default SHA-1), [2] saltLength (default 20). */
function pssParameters(der: Uint8Array, params: Tlv): { hash: string; saltLength: number } {
  let hash = "sha1";
  let saltLength = 20;
  for (const field of params.tag === 0x30 ? children(der, params) : []) {
    const inner = children(der, field)[0];
    if (!inner) continue;
    if (field.tag === 0xa0) {
      const oid = children(der, inner)[0];
      hash = (oid && PSS_HASHES[oidOf(der, oid)]) ?? "unsupported";
    } else if (field.tag === 0xa2 && inner.tag === 0x02) {
      saltLength = Number.parseInt(Buffer.from(der.subarray(inner.body, inner.end)).toString("hex"), 16);
    }
  }
  return { hash, saltLength };
}

/** Whether `ca`'s key signed the CRL (false for a CA of another key type, or an algorithm not known). */
export async function crlSignedBy(crl: Crl, ca: X509Certificate): Promise<boolean> {
  const { tbs, algorithm, pss, signature } = crl.signed;
  try {
    if (pss) {
      return verify(
        pss.hash,
        tbs,
        { key: ca.publicKey, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: pss.saltLength },
        signature,
      );
    }
    if (!(algorithm in SIGNATURE_DIGESTS)) return false;
    return verify(SIGNATURE_DIGESTS[algorithm] ?? null, tbs, ca.publicKey, signature);
  } catch {
    return false; // a key of another type
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
 * CRL checks on, so does every peer of that CA. Node does not expose the bits: they are read from
 * the certificate's extensions.
 */
export async function allowsCrlSigning(ca: X509Certificate): Promise<boolean> {
  const der = ca.raw;
  const tbs = children(der, tlv(der, 0))[0];
  const extensions = tbs ? children(der, tbs).find((f) => f.tag === 0xa3) : undefined;
  const list = extensions ? children(der, extensions)[0] : undefined;
  for (const extension of list ? children(der, list) : []) {
    const parts = children(der, extension);
    if (!parts[0] || oidOf(der, parts[0]) !== "2.5.29.15") continue; // keyUsage
    const value = parts.at(-1) as Tlv; // OCTET STRING holding a BIT STRING
    const bits = tlv(der, value.body);
    const first = der[bits.body + 1] ?? 0; // the byte after the unused-bits count: bits 0-7
    return (first & 0x02) !== 0; // cRLSign is bit 6: the second lowest of the first byte
  }
  return true;
}
