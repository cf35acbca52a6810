// The development CA's cryptography: root CA, service certificates and CRLs, made with
// @peculiar/x509 (through proxy/x509.ts, which sets its provider) on Node's WebCrypto. No files
// and no openssl child process here; store.ts decides where things are written.
import { createPrivateKey, randomBytes, webcrypto, X509Certificate } from "node:crypto";
import { isIP } from "node:net";
import type * as X509 from "@peculiar/x509";
import { peculiar } from "../proxy/x509.js";

type CryptoKey = webcrypto.CryptoKey;
type CryptoKeyPair = webcrypto.CryptoKeyPair;
const subtle = webcrypto.subtle;

export type KeyAlgorithm = "ecdsa" | "rsa";

export interface KeyPairPem {
  certPem: string;
  keyPem: string;
}

export interface IssuedCertificate extends KeyPairPem {
  serial: string;
  notBefore: Date;
  notAfter: Date;
  fingerprint256: string;
}

export interface IssueRequest {
  /** Subject CN; also the first DNS SAN unless `dns` is given. */
  commonName: string;
  dns?: string[];
  ip?: string[];
  uri?: string[];
  days?: number;
  notBefore?: Date;
  algorithm?: KeyAlgorithm;
  /** CRL distribution points (http or https URLs) the certificate names. */
  crlUrls?: string[];
}

export interface RevokedEntry {
  serial: string;
  revokedAt: Date;
}

const DAY_MS = 86_400_000;
// The seed's certificate properties: ECDSA P-256 (or RSA 2048), SHA-256.
const ALGORITHMS = {
  ecdsa: { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" },
  rsa: {
    name: "RSASSA-PKCS1-v1_5",
    modulusLength: 2048,
    publicExponent: new Uint8Array([1, 0, 1]),
    hash: "SHA-256",
  },
} as const;

/** A positive, unique 16-byte serial in lower-case hex, as RFC 5280 asks (at most 20 bytes). */
export function newSerial(): string {
  const bytes = randomBytes(16);
  bytes[0] = ((bytes[0] ?? 0) & 0x7f) | 0x10; // positive and never shortened by a leading zero
  return bytes.toString("hex");
}

async function generateKeys(algorithm: KeyAlgorithm): Promise<CryptoKeyPair> {
  return (await subtle.generateKey(ALGORITHMS[algorithm], true, ["sign", "verify"])) as CryptoKeyPair;
}

/** @peculiar/x509 ends PEM without a newline; `cat a.crt b.crt > bundle` would then glue two blocks. */
const line = (pem: string) => (pem.endsWith("\n") ? pem : `${pem}\n`);

async function privateKeyPem(key: CryptoKey): Promise<string> {
  const x509 = await peculiar();
  const der = await subtle.exportKey("pkcs8", key);
  return line(x509.PemConverter.encode(der, "PRIVATE KEY"));
}

/** The algorithm of a PEM private key, so that a reissue keeps it. */
export function keyAlgorithm(keyPem: string): KeyAlgorithm {
  return createPrivateKey(keyPem).asymmetricKeyType === "rsa" ? "rsa" : "ecdsa";
}

/** Loads a PEM private key (PKCS#8, SEC1 or PKCS#1) as a WebCrypto signing key. */
async function importSigningKey(keyPem: string): Promise<{ key: CryptoKey; algorithm: KeyAlgorithm }> {
  const keyObject = createPrivateKey(keyPem);
  const algorithm: KeyAlgorithm = keyObject.asymmetricKeyType === "rsa" ? "rsa" : "ecdsa";
  if (keyObject.asymmetricKeyType !== "rsa" && keyObject.asymmetricKeyType !== "ec") {
    throw new Error(`CA key type ${keyObject.asymmetricKeyType} is not supported: use ECDSA P-256 or RSA`);
  }
  const der = keyObject.export({ format: "der", type: "pkcs8" });
  const key = await subtle.importKey("pkcs8", der, ALGORITHMS[algorithm], false, ["sign"]);
  return { key: key as CryptoKey, algorithm };
}

function window(days: number, notBefore?: Date): { notBefore: Date; notAfter: Date } {
  // Backdate a minute so a peer whose clock is slightly behind still accepts a fresh certificate.
  const start = notBefore ?? new Date(Date.now() - 60_000);
  return { notBefore: start, notAfter: new Date(start.getTime() + days * DAY_MS) };
}

function fingerprint(certPem: string): string {
  return new X509Certificate(certPem).fingerprint256;
}

/** A self-signed root CA: 10 years by default, may sign certificates and CRLs. */
/** What createCa and issueCertificate hand back: the PEMs and what callers index them by. */
async function issued(
  cert: X509.X509Certificate,
  keys: CryptoKeyPair,
  serial: string,
  notBefore: Date,
  notAfter: Date,
): Promise<IssuedCertificate> {
  const certPem = line(cert.toString("pem"));
  return {
    certPem,
    keyPem: await privateKeyPem(keys.privateKey),
    serial,
    notBefore,
    notAfter,
    fingerprint256: fingerprint(certPem),
  };
}

export async function createCa(options: {
  commonName?: string;
  /** An OU that tells CAs of one name apart (the CA roll's "generation 2"). */
  unit?: string;
  days?: number;
  algorithm?: KeyAlgorithm;
}): Promise<IssuedCertificate> {
  const x509 = await peculiar();
  const algorithm = options.algorithm ?? "ecdsa";
  const keys = await generateKeys(algorithm);
  const serial = newSerial();
  const { notBefore, notAfter } = window(options.days ?? 3650);
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial,
    name: `O=ashmesh development CA, ${options.unit ? `OU=${options.unit}, ` : ""}CN=${options.commonName ?? "ashchan-ca"}`,
    notBefore,
    notAfter,
    signingAlgorithm: ALGORITHMS[algorithm],
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return issued(cert, keys, serial, notBefore, notAfter);
}

/** A service certificate for both ends of mTLS: EKU serverAuth + clientAuth, one year by default. */
export async function issueCertificate(ca: KeyPairPem, request: IssueRequest): Promise<IssuedCertificate> {
  const x509 = await peculiar();
  const caCert = new x509.X509Certificate(ca.certPem);
  const { key: caKey, algorithm: caAlgorithm } = await importSigningKey(ca.keyPem);
  const keys = await generateKeys(request.algorithm ?? "ecdsa");
  const serial = newSerial();
  const { notBefore, notAfter } = window(request.days ?? 365, request.notBefore);

  const names: X509.JsonGeneralName[] = [];
  for (const dns of request.dns ?? [request.commonName]) names.push({ type: "dns", value: dns });
  for (const ip of request.ip ?? []) {
    if (isIP(ip) === 0) throw new Error(`IP SAN ${JSON.stringify(ip)} is not an IPv4 or IPv6 address`);
    names.push({ type: "ip", value: ip });
  }
  for (const uri of request.uri ?? []) names.push({ type: "url", value: uri });

  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial,
    subject: `CN=${request.commonName}`,
    issuer: caCert.subject,
    notBefore,
    notAfter,
    signingAlgorithm: ALGORITHMS[caAlgorithm],
    publicKey: keys.publicKey,
    signingKey: caKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature | x509.KeyUsageFlags.keyEncipherment, true),
      new x509.ExtendedKeyUsageExtension([x509.ExtendedKeyUsage.serverAuth, x509.ExtendedKeyUsage.clientAuth]),
      new x509.SubjectAlternativeNameExtension(names),
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
      ...(request.crlUrls?.length ? [new x509.CRLDistributionPointsExtension(request.crlUrls)] : []),
    ],
  });
  return issued(cert, keys, serial, notBefore, notAfter);
}

/**
 * A CRL signed by the CA, in the PEM label OpenSSL and Node read (`X509 CRL`; @peculiar/x509
 * writes `CRL`, which neither accepts).
 */
export async function createCrl(
  ca: KeyPairPem,
  options: { revoked: RevokedEntry[]; number: number; thisUpdate?: Date; nextUpdateDays?: number },
): Promise<string> {
  const x509 = await peculiar();
  const caCert = new x509.X509Certificate(ca.certPem);
  const { key, algorithm } = await importSigningKey(ca.keyPem);
  const thisUpdate = options.thisUpdate ?? new Date(Date.now() - 60_000);
  const nextUpdate = new Date(thisUpdate.getTime() + (options.nextUpdateDays ?? 7) * DAY_MS);
  const crl = await x509.X509CrlGenerator.create({
    issuer: caCert.subject,
    thisUpdate,
    nextUpdate,
    signingAlgorithm: ALGORITHMS[algorithm],
    signingKey: key,
    entries: options.revoked.map((entry) => ({
      serialNumber: entry.serial,
      revocationDate: entry.revokedAt,
      reason: x509.X509CrlReason.keyCompromise,
    })),
    extensions: [
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
      new x509.Extension("2.5.29.20", false, crlNumber(options.number)),
    ],
  });
  return line(x509.PemConverter.encode(crl.rawData, "X509 CRL"));
}

/** DER INTEGER for the cRLNumber extension (RFC 5280 §5.2.3). */
function crlNumber(value: number): ArrayBuffer {
  let hex = Math.max(0, Math.floor(value)).toString(16);
  if (hex.length % 2) hex = `0${hex}`;
  let bytes = Buffer.from(hex, "hex");
  if ((bytes[0] ?? 0) & 0x80) bytes = Buffer.concat([Buffer.of(0), bytes]);
  const der = Buffer.concat([Buffer.of(0x02, bytes.length), bytes]);
  return der.buffer.slice(der.byteOffset, der.byteOffset + der.length) as ArrayBuffer;
}
