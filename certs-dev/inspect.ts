// `ashmesh certs inspect`: a certificate (or chain), a CA bundle or a CRL, in words a person
// reads, from any PEM or DER file (ours, openssl's, another CA's). Node reads certificates;
// @peculiar/x509 reads CRLs and the key usage bits, which Node does not expose. With --ca the
// chain is checked, with --crl the revocation status, as a sidecar would check them.
import { createPrivateKey, type KeyObject, X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import type * as X509 from "@peculiar/x509";
import {
  EKU_NAMES,
  issuedBy,
  issuerOf,
  keyDescription,
  nameToRfc2253,
  normalizeSerial,
  type Peculiar,
  peculiar,
  pemBlocks,
  selfSigned,
  serialOf,
  subjectOf,
} from "../proxy/x509.js";
import { CaError } from "./store.js";

const DAY_MS = 86_400_000;
/** Key usage bit names, in the order of their bits (RFC 5280 §4.2.1.3, @peculiar's KeyUsageFlags). */
const KU_NAMES = [
  "digitalSignature",
  "nonRepudiation",
  "keyEncipherment",
  "dataEncipherment",
  "keyAgreement",
  "keyCertSign",
  "cRLSign",
  "encipherOnly",
  "decipherOnly",
];

export interface Contents {
  certs: X509Certificate[];
  crls: X509.X509Crl[];
  keys: KeyObject[];
  /** Things worth saying about the file itself (a PEM label OpenSSL does not read, ...). */
  notes: string[];
}

/** Every certificate, CRL and private key in a PEM file (any order), or one DER certificate or CRL. */
export async function readContents(file: string, role = "FILE"): Promise<Contents> {
  const x509 = await peculiar();
  let data: Buffer;
  try {
    data = readFileSync(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    throw new CaError(
      `${role} ${file}: cannot read it (${code === "ENOENT" ? "no such file: check the path" : (code ?? (err as Error).message)})`,
    );
  }
  const out: Contents = { certs: [], crls: [], keys: [], notes: [] };
  const blocks = pemBlocks(data.toString("latin1"));
  const bad = (what: string, err: unknown) =>
    new CaError(`${role} ${file}: ${what} does not parse: ${(err as Error).message}`);
  for (const [i, { label, der, text }] of blocks.entries()) {
    try {
      if (label === "CERTIFICATE") out.certs.push(new X509Certificate(der));
      else if (label === "X509 CRL" || label === "CRL") {
        out.crls.push(new x509.X509Crl(der));
        if (label === "CRL")
          out.notes.push(
            `PEM block #${i + 1} is labelled CRL: OpenSSL and Node read only "X509 CRL"; rename the BEGIN/END lines`,
          );
      } else if (label.endsWith("PRIVATE KEY") && label !== "ENCRYPTED PRIVATE KEY")
        out.keys.push(createPrivateKey(text));
      else out.notes.push(`PEM block #${i + 1} (${label}) is not shown`);
    } catch (err) {
      throw bad(`PEM block #${i + 1} (${label})`, err);
    }
  }
  if (blocks.length === 0) {
    // DER: openssl writes it with -outform DER
    try {
      out.certs.push(new X509Certificate(data));
    } catch {
      try {
        out.crls.push(new x509.X509Crl(data));
      } catch {
        throw new CaError(`${role} ${file}: no certificate, CRL or private key in it (PEM or DER)`);
      }
    }
  }
  return out;
}

const day = (d: Date) =>
  d
    .toISOString()
    .replace("T", " ")
    .replace(/\.\d+Z$/, " UTC");

function daysLeft(notAfter: Date, now: Date): string {
  if (notAfter < now) return `EXPIRED ${Math.floor((now.getTime() - notAfter.getTime()) / DAY_MS)} day(s) ago`;
  return `${Math.floor((notAfter.getTime() - now.getTime()) / DAY_MS)} day(s) left`;
}

function describeCertificate(x509: Peculiar, cert: X509Certificate, title: string, now: Date): string[] {
  const notBefore = new Date(cert.validFrom);
  const notAfter = new Date(cert.validTo);
  const ext = new x509.X509Certificate(cert.raw);
  const ku = ext.getExtension(x509.KeyUsagesExtension);
  const basic = ext.getExtension(x509.BasicConstraintsExtension);
  const validity =
    now < notBefore
      ? `NOT YET VALID (starts in ${Math.ceil((notBefore.getTime() - now.getTime()) / DAY_MS)} day(s))`
      : daysLeft(notAfter, now);
  return [
    title,
    `  subject:   ${subjectOf(cert)}`,
    `  SANs:      ${cert.subjectAltName?.replaceAll("IP Address:", "IP:") ?? "none"}`,
    `  issuer:    ${issuerOf(cert)}${selfSigned(cert) ? " (self-signed)" : ""}`,
    `  serial:    ${serialOf(cert)}`,
    `  valid:     ${day(notBefore)} to ${day(notAfter)}: ${validity}`,
    `  SHA-256:   ${cert.fingerprint256}`,
    `  key:       ${keyDescription(cert.publicKey)}`,
    `  key usage: ${ku ? KU_NAMES.filter((_, bit) => ku.usages & (1 << bit)).join(", ") : "not restricted"}`,
    `  extended:  ${cert.keyUsage?.length ? cert.keyUsage.map((o) => EKU_NAMES[o] ?? o).join(", ") : "not restricted"}`,
    `  CA:        ${cert.ca ? `yes${basic?.pathLength !== undefined ? ` (path length ${basic.pathLength})` : ""}` : "no"}`,
  ];
}

function describeCrl(x509: Peculiar, crl: X509.X509Crl, title: string, now: Date): string[] {
  const number = crl.extensions.find((e) => e.type === "2.5.29.20");
  const next = crl.nextUpdate;
  const entries = crl.entries;
  const lines = [
    title,
    `  issuer:      ${nameToRfc2253(crl.issuerName)}`,
    `  CRL number:  ${number ? crlNumber(number.value) : "none"}`,
    `  this update: ${day(crl.thisUpdate)}`,
    `  next update: ${next ? `${day(next)}: ${next < now ? "PAST: sidecars refuse this CRL and every peer of its CA; publish a fresh one (ashmesh certs renew)" : daysLeft(next, now)}` : "none"}`,
    `  revoked:     ${entries.length} certificate(s)`,
  ];
  for (const e of entries.slice(0, 50)) {
    const reason = e.reason !== undefined ? x509.X509CrlReason[e.reason] : "no reason given";
    lines.push(`    ${normalizeSerial(e.serialNumber)}  on ${day(e.revocationDate)} (${reason})`);
  }
  if (entries.length > 50) lines.push(`    … and ${entries.length - 50} more`);
  return lines;
}

/** The cRLNumber extension's DER INTEGER, as a decimal. */
function crlNumber(der: ArrayBuffer): string {
  const bytes = Buffer.from(der);
  return bytes[0] === 0x02
    ? BigInt(`0x${bytes.subarray(2, 2 + (bytes[1] ?? 0)).toString("hex") || "0"}`).toString()
    : "?";
}

interface Check {
  ok: boolean;
  lines: string[];
}

/** Builds the chain from `leaf` through `intermediates` to a CA of the bundle, checking dates on the way. */
function checkChain(
  leaf: X509Certificate,
  intermediates: readonly X509Certificate[],
  bundle: readonly X509Certificate[],
  bundleFile: string,
  now: Date,
): Check & { path: X509Certificate[] } {
  const path = [leaf];
  const fail = (why: string) => ({ ok: false, path, lines: [`  chain:     FAILED: ${why}`] });
  let current = leaf;
  for (let depth = 0; depth < 8; depth++) {
    if (now > new Date(current.validTo))
      return fail(`${subjectOf(current)} expired on ${day(new Date(current.validTo))}`);
    if (now < new Date(current.validFrom))
      return fail(`${subjectOf(current)} is not valid before ${day(new Date(current.validFrom))}`);
    const anchor = bundle.find((ca) => issuedBy(current, ca));
    if (anchor) {
      if (!anchor.ca) return fail(`${subjectOf(anchor)} in ${bundleFile} is not a CA certificate`);
      if (now > new Date(anchor.validTo))
        return fail(`CA ${subjectOf(anchor)} expired on ${day(new Date(anchor.validTo))}`);
      if (anchor.fingerprint256 !== current.fingerprint256) path.push(anchor);
      const shown = path.map((c) => subjectOf(c)).join(" → ");
      return {
        ok: true,
        path,
        lines: [`  chain:     OK: ${shown} (CA serial ${serialOf(anchor)} in ${bundleFile})`],
      };
    }
    const next = intermediates.find((i) => i !== current && i.ca && issuedBy(current, i));
    if (!next) {
      const sameName = bundle.find((ca) => ca.subject === current.issuer);
      const issuer = issuerOf(current);
      return fail(
        sameName
          ? `${subjectOf(current)} names issuer ${issuer}, but the CA of that name in ${bundleFile} (serial ${serialOf(sameName)}) did not sign it: another CA of the same name`
          : `issuer ${issuer} of ${subjectOf(current)} is not in ${bundleFile} (it holds: ${bundle.map(subjectOf).join("; ") || "no certificate"})`,
      );
    }
    path.push(next);
    current = next;
  }
  return fail("longer than 8 certificates");
}

/** Revocation of every certificate of `path` but its root, as a sidecar checks it (every level). */
async function checkRevocation(
  x509: Peculiar,
  path: readonly X509Certificate[],
  known: readonly X509Certificate[],
  crls: readonly X509.X509Crl[],
  crlFile: string,
  now: Date,
): Promise<Check> {
  const lines: string[] = [];
  let ok = true;
  for (const cert of path) {
    if (selfSigned(cert)) continue;
    const issuer = known.find((ca) => issuedBy(cert, ca));
    const name = new x509.X509Certificate(cert.raw).issuer;
    const candidates: Array<{ crl: X509.X509Crl; verified: boolean }> = [];
    for (const crl of crls) {
      if (crl.issuer !== name) continue;
      const verified = issuer ? await crl.verify({ publicKey: new x509.X509Certificate(issuer.raw) }) : false;
      if (issuer && !verified) continue; // a CRL of another CA of the same name
      candidates.push({ crl, verified });
    }
    const label = path.length > 1 && cert !== path[0] ? ` (${subjectOf(cert)})` : "";
    const newest = candidates.sort((a, b) => b.crl.thisUpdate.getTime() - a.crl.thisUpdate.getTime())[0];
    if (!newest) {
      ok = false;
      lines.push(
        `  revocation${label}: UNKNOWN: ${crlFile} has no CRL of ${issuerOf(cert)}${issuer ? " signed by that CA" : ""}; a sidecar would refuse the certificate`,
      );
      continue;
    }
    const { crl, verified } = newest;
    const entry = crl.entries.find((e) => normalizeSerial(e.serialNumber) === serialOf(cert));
    const signature = verified ? "signature checked" : "signature not checked: give --ca";
    if (entry) {
      ok = false;
      const reason = entry.reason !== undefined ? x509.X509CrlReason[entry.reason] : "no reason given";
      lines.push(`  revocation${label}: REVOKED on ${day(entry.revocationDate)} (${reason}) (${signature})`);
    } else if (crl.nextUpdate && crl.nextUpdate < now) {
      ok = false;
      lines.push(
        `  revocation${label}: UNKNOWN: the CRL is past its nextUpdate (${day(crl.nextUpdate)}); sidecars refuse it`,
      );
    } else {
      lines.push(`  revocation${label}: not revoked (CRL of ${thisUpdateText(crl)}, ${signature})`);
    }
  }
  return { ok, lines };
}

const thisUpdateText = (crl: X509.X509Crl) =>
  `${day(crl.thisUpdate)}${crl.nextUpdate ? `, next update ${day(crl.nextUpdate)}` : ""}`;

export interface InspectResult {
  lines: string[];
  /** False when a check that was asked for (--ca, --crl) failed. */
  ok: boolean;
}

export async function inspect(
  file: string,
  options: { ca?: string; crl?: string; now?: Date } = {},
): Promise<InspectResult> {
  const now = options.now ?? new Date();
  const x509 = await peculiar();
  const contents = await readContents(file);
  const bundle = options.ca ? (await readContents(options.ca, "--ca")).certs : [];
  if (options.ca && bundle.length === 0) throw new CaError(`--ca ${options.ca}: no certificate in it`);
  const crlList = options.crl ? (await readContents(options.crl, "--crl")).crls : [];
  if (options.crl && crlList.length === 0) throw new CaError(`--crl ${options.crl}: no CRL in it`);

  const lines: string[] = [];
  let ok = true;
  const { certs, crls, keys } = contents;
  // A file whose first certificate is a CA is a bundle: each CA on its own. Otherwise the first
  // is a leaf and the rest its chain, as a sidecar reads tls.cert.
  const isBundle = certs.length > 0 && certs.every((c) => c.ca);
  const count = certs.length;
  for (const [i, cert] of certs.entries()) {
    const role = isBundle ? "CA" : i === 0 ? "leaf" : "intermediate CA";
    lines.push(...describeCertificate(x509, cert, `certificate ${i + 1} of ${count} (${role}) in ${file}`, now));
    if (!isBundle && i > 0) continue;
    const rest = isBundle ? [] : certs.slice(1);
    let path = [cert, ...rest];
    if (options.ca) {
      const chain = checkChain(cert, rest, bundle, options.ca, now);
      lines.push(...chain.lines);
      ok &&= chain.ok;
      if (chain.ok) path = chain.path;
    }
    if (options.crl) {
      const revocation = await checkRevocation(x509, path, [...bundle, ...certs], crlList, options.crl, now);
      lines.push(...revocation.lines);
      ok &&= revocation.ok;
    }
  }
  if (!isBundle && count > 1) {
    for (const [i, cert] of certs.entries()) {
      if (i > 0 && !certs.some((c) => c !== cert && c.checkIssued(cert)))
        lines.push(`  note: certificate ${i + 1} signs none of the others in the file`);
    }
  }
  for (const [i, crl] of crls.entries()) {
    lines.push(...describeCrl(x509, crl, `CRL ${i + 1} of ${crls.length} in ${file}`, now));
    if (options.ca) {
      let signer: X509Certificate | undefined;
      for (const ca of bundle) {
        if (await crl.verify({ publicKey: new x509.X509Certificate(ca.raw) }).catch(() => false)) {
          signer = ca;
          break;
        }
      }
      if (signer) lines.push(`  signed by:   ${subjectOf(signer)} (serial ${serialOf(signer)} in ${options.ca})`);
      else {
        ok = false;
        lines.push(`  signed by:   NONE of the CAs in ${options.ca}: a sidecar with that bundle refuses this CRL`);
      }
    }
  }
  for (const key of keys) {
    const match = certs.find((c) => c.checkPrivateKey(key));
    lines.push(
      `private key: ${keyDescription(key)}${match ? `, matches ${subjectOf(match)}` : certs.length ? ", matches no certificate in the file" : ""} (the key itself is not shown)`,
    );
  }
  for (const note of contents.notes) lines.push(`note: ${note}`);
  if (options.crl && certs.length === 0) lines.push(`note: --crl checks certificates, and ${file} holds none`);
  return { lines, ok };
}
