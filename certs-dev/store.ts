// The development CA on disk. Layout of DIR (default .ashmesh/pki):
//   ca/ca.key, ca/ca.crt, ca/index.json   private: the signing CA and its record of what it issued
//   ca/<serial>/ca.key, ca.crt            private: every other CA of a CA roll (next, previous, retired)
//   trust/ca.crt, trust/ca.crl            public: what every sidecar trusts (mount read-only); one CA
//                                         and one CRL per trusted CA (two of each during a CA roll)
//   <dns-name>/server.crt, server.key     one identity per service
// Every file is written by rename, so a watcher never sees half a file; keys are 0600, certs 0644;
// nothing is overwritten unless the caller says so.
// writeAtomic lives in proxy/files.ts (the ACME manager and the CRL fetcher write with it too).
import { createPrivateKey, X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { writeAtomic } from "../proxy/files.js";
import { normalizeSerial, subjectOf } from "../proxy/x509.js";
import {
  createCa,
  createCrl,
  type IssueRequest,
  issueCertificate,
  type KeyAlgorithm,
  type KeyPairPem,
  keyAlgorithm,
} from "./pki.js";

export { writeAtomic };

export interface IssuedRecord {
  name: string;
  serial: string;
  commonName: string;
  dns: string[];
  ip: string[];
  uri: string[];
  notBefore: string;
  notAfter: string;
  /** Serial of the CA that signed it. */
  caSerial: string;
  sha256: string;
  revokedAt: string | null;
  /** True once a newer certificate for the same name was issued. */
  superseded: boolean;
  /** Key algorithm, so that a reissue keeps it (absent in older indexes: read from the key). */
  algorithm?: KeyAlgorithm;
}

export interface CaRecord {
  serial: string;
  subject: string;
  notAfter: string;
  /**
   * "active" signs new certificates (ca/ca.key); during a CA roll "next" is trusted but does not
   * sign yet, "previous" is still trusted but no longer signs; "retired" is trusted by nobody.
   */
  status: "active" | "next" | "previous" | "retired";
}

export interface Index {
  version: 1;
  crlNumber: number;
  cas: CaRecord[];
  issued: IssuedRecord[];
}

export class CaError extends Error {
  readonly code = "ASHMESH_CA";
  constructor(message: string) {
    super(message);
    this.name = "CaError";
  }
}

export const DEFAULT_PKI_DIR = ".ashmesh/pki";
const DAY_MS = 86_400_000;
const RESERVED = new Set(["ca", "trust"]);
const NAME = /^[a-zA-Z0-9_](?:[a-zA-Z0-9_.-]{0,251}[a-zA-Z0-9_])?$/;

/** Current: the newest certificate of its name, not revoked. */
export function isCurrent(r: IssuedRecord): boolean {
  return !r.superseded && r.revokedAt === null;
}

/** The whole days of a certificate's lifetime, so a reissue lasts as long as the original did. */
export function lifetimeDays(r: IssuedRecord): number {
  return Math.max(1, Math.round((Date.parse(r.notAfter) - Date.parse(r.notBefore)) / DAY_MS));
}

export interface IdentityFiles {
  dir: string;
  cert: string;
  key: string;
  ca: string;
  crl: string;
}

export class DevCa {
  private constructor(
    readonly dir: string,
    private index: Index,
  ) {}

  static paths(dir: string) {
    return {
      caKey: join(dir, "ca", "ca.key"),
      caCert: join(dir, "ca", "ca.crt"),
      index: join(dir, "ca", "index.json"),
      trustCa: join(dir, "trust", "ca.crt"),
      trustCrl: join(dir, "trust", "ca.crl"),
    };
  }

  static exists(dir: string): boolean {
    return existsSync(DevCa.paths(dir).index);
  }

  /** A new root CA, an empty CRL and the trust bundle. Refuses to replace an existing CA. */
  static async init(
    dir: string,
    options: { algorithm?: KeyAlgorithm; commonName?: string; days?: number } = {},
  ): Promise<DevCa> {
    const p = DevCa.paths(dir);
    if (existsSync(p.caKey) || existsSync(p.index)) {
      throw new CaError(`${dir} already holds a CA (${p.caCert}); use it, or remove the directory to start over`);
    }
    const ca = await createCa({
      algorithm: options.algorithm ?? "ecdsa",
      commonName: options.commonName ?? "ashchan-ca",
      days: options.days ?? 3650,
    });
    writeAtomic(p.caKey, ca.keyPem, 0o600);
    writeAtomic(p.caCert, ca.certPem, 0o644);
    const subject = subjectOf(new X509Certificate(ca.certPem));
    const index: Index = {
      version: 1,
      crlNumber: 0,
      cas: [{ serial: ca.serial, subject, notAfter: ca.notAfter.toISOString(), status: "active" }],
      issued: [],
    };
    const store = new DevCa(dir, index);
    store.saveIndex();
    store.writeTrust();
    await store.writeCrl();
    return store;
  }

  static open(dir: string): DevCa {
    const p = DevCa.paths(dir);
    let text: string;
    try {
      text = readFileSync(p.index, "utf8");
    } catch {
      throw new CaError(`no development CA in ${dir}: run \`ashmesh certs init --dir ${dir}\` first`);
    }
    let index: Index;
    try {
      index = JSON.parse(text) as Index;
    } catch (err) {
      throw new CaError(`${p.index}: not valid JSON (${(err as Error).message}); restore it from a backup`);
    }
    if (index.version !== 1) throw new CaError(`${p.index}: unknown index version ${String(index.version)}`);
    return new DevCa(dir, index);
  }

  get records(): readonly IssuedRecord[] {
    return this.index.issued;
  }

  get cas(): readonly CaRecord[] {
    return this.index.cas;
  }

  /** The CA that signs: exactly one has status "active". */
  get active(): CaRecord {
    const active = this.index.cas.find((c) => c.status === "active");
    if (!active) throw new CaError(`${DevCa.paths(this.dir).index}: no active CA; restore the index from a backup`);
    return active;
  }

  /** The CAs sidecars trust: the active one, and during a CA roll the next or previous one. */
  trustedCas(): CaRecord[] {
    return this.index.cas.filter((c) => c.status !== "retired");
  }

  /** Changes the index and saves it (ca-roll.ts moves CAs between statuses here). */
  update(change: (index: Index) => void): void {
    change(this.index);
    this.saveIndex();
  }

  private saveIndex(): void {
    writeAtomic(DevCa.paths(this.dir).index, `${JSON.stringify(this.index, null, 2)}\n`, 0o600);
  }

  /** Where a CA's key and certificate live: the active one in ca/, every other in ca/<serial>/. */
  caFiles(ca: Pick<CaRecord, "serial" | "status">): { key: string; cert: string } {
    const p = DevCa.paths(this.dir);
    if (ca.status === "active") return { key: p.caKey, cert: p.caCert };
    return { key: join(this.dir, "ca", ca.serial, "ca.key"), cert: join(this.dir, "ca", ca.serial, "ca.crt") };
  }

  /** Any CA's key and certificate (the CRL of each trusted CA is signed by that CA). */
  caKeyPair(ca: Pick<CaRecord, "serial" | "status">): KeyPairPem {
    if (ca.status === "active") return this.signer();
    const files = this.caFiles(ca);
    try {
      return { certPem: readFileSync(files.cert, "utf8"), keyPem: readFileSync(files.key, "utf8") };
    } catch (err) {
      throw new CaError(
        `cannot read CA ${ca.serial} (${files.key}, ${files.cert}): ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}; restore them from a backup`,
      );
    }
  }

  /**
   * The signing CA: ca/ca.key and ca/ca.crt, checked against the index so that a CA roll
   * interrupted between writing these two files and the index never signs with a mixed pair.
   */
  signer(): KeyPairPem {
    const p = DevCa.paths(this.dir);
    const pair = { certPem: readFileSync(p.caCert, "utf8"), keyPem: readFileSync(p.caKey, "utf8") };
    const cert = new X509Certificate(pair.certPem);
    const active = this.active;
    if (
      normalizeSerial(cert.serialNumber) !== normalizeSerial(active.serial) ||
      !cert.checkPrivateKey(createPrivateKey(pair.keyPem))
    ) {
      throw new CaError(
        `${p.caCert} and ${p.caKey} are not the active CA of ${p.index} (serial ${active.serial}): a CA roll was interrupted; run \`ashmesh certs rotate ca --phase switch --dir ${this.dir}\` again`,
      );
    }
    return pair;
  }

  identityFiles(name: string): IdentityFiles {
    const p = DevCa.paths(this.dir);
    const dir = join(this.dir, name);
    return { dir, cert: join(dir, "server.crt"), key: join(dir, "server.key"), ca: p.trustCa, crl: p.trustCrl };
  }

  /** The newest certificate of `name` (revoked or not), or undefined. */
  latest(name: string): IssuedRecord | undefined {
    return this.index.issued.findLast((r) => r.name === name && !r.superseded);
  }

  /**
   * A certificate and key for `name` (a DNS name: the CN and first DNS SAN, and the directory).
   * An existing one is replaced only with `replace` (rotation): key first, then certificate, each by rename.
   */
  async issue(
    name: string,
    request: Omit<IssueRequest, "commonName"> & { replace?: boolean } = {},
  ): Promise<IssuedRecord> {
    if (!NAME.test(name) || RESERVED.has(name)) {
      throw new CaError(`"${name}" is not a usable identity name: use a DNS name such as auth.ashchan.local`);
    }
    const files = this.identityFiles(name);
    if (!request.replace && (existsSync(files.cert) || existsSync(files.key))) {
      throw new CaError(`${files.cert} already exists: use \`ashmesh certs rotate ${name}\` to replace it`);
    }
    const dns = [...new Set([name, ...(request.dns ?? [])])];
    const issued = await issueCertificate(this.signer(), { ...request, commonName: name, dns });
    // The key goes first: for a moment the old cert sits beside the new key, which validation
    // rejects (key does not match) and the watcher retries; never a new cert with an old key.
    writeAtomic(files.key, issued.keyPem, 0o600);
    writeAtomic(files.cert, issued.certPem, 0o644);
    for (const r of this.index.issued) if (r.name === name) r.superseded = true;
    const record: IssuedRecord = {
      name,
      serial: issued.serial,
      commonName: name,
      dns,
      ip: request.ip ?? [],
      uri: request.uri ?? [],
      notBefore: issued.notBefore.toISOString(),
      notAfter: issued.notAfter.toISOString(),
      caSerial: this.active.serial,
      sha256: issued.fingerprint256,
      revokedAt: null,
      superseded: false,
      algorithm: request.algorithm ?? "ecdsa",
    };
    this.index.issued.push(record);
    this.saveIndex();
    return record;
  }

  /**
   * A new key and certificate for an issued name, signed by the active CA, with the SANs and the
   * lifetime of the newest one (`days` and `algorithm` override). The old certificate is
   * superseded, not revoked: sidecars that have not reloaded yet keep working with it.
   */
  async rotate(
    name: string,
    options: { days?: number; algorithm?: KeyAlgorithm } = {},
  ): Promise<{ previous: IssuedRecord; record: IssuedRecord }> {
    const previous = this.latest(name);
    if (!previous) {
      throw new CaError(
        `${name}: no certificate of that name in ${DevCa.paths(this.dir).index}; issue one with \`ashmesh certs issue ${name}\``,
      );
    }
    const record = await this.issue(name, {
      dns: previous.dns,
      ip: previous.ip,
      uri: previous.uri,
      days: options.days ?? lifetimeDays(previous),
      algorithm: options.algorithm ?? previous.algorithm ?? this.algorithmOnDisk(name),
      replace: true,
    });
    return { previous, record };
  }

  private algorithmOnDisk(name: string): KeyAlgorithm {
    try {
      return keyAlgorithm(readFileSync(this.identityFiles(name).key, "utf8"));
    } catch {
      return "ecdsa"; // no readable key: the default, as `issue` would choose
    }
  }

  /**
   * Revokes by serial (any case, colons, `serial=` as openssl prints it), or every unrevoked
   * certificate of a name; then writes new CRLs. A certificate goes on the CRL of the CA that issued it.
   */
  async revoke(nameOrSerial: string): Promise<IssuedRecord[]> {
    const name = nameOrSerial.trim().toLowerCase();
    const serial = normalizeSerial(nameOrSerial);
    const matches = (r: IssuedRecord) => r.name.toLowerCase() === name || normalizeSerial(r.serial) === serial;
    const found = this.index.issued.filter((r) => r.revokedAt === null && matches(r));
    if (found.length === 0) {
      const known = this.index.issued.some(matches);
      throw new CaError(
        known
          ? `${nameOrSerial}: already revoked (see \`ashmesh certs inspect ${DevCa.paths(this.dir).trustCrl}\`)`
          : `${nameOrSerial}: no certificate of that name or serial in ${DevCa.paths(this.dir).index}; \`ashmesh certs inspect FILE\` shows a certificate's serial`,
      );
    }
    const now = new Date().toISOString();
    for (const r of found) r.revokedAt = now;
    this.saveIndex();
    await this.writeCrl();
    return found;
  }

  /** trust/ca.crt: the bundle of every trusted CA (two during a CA roll). */
  writeTrust(cas: readonly CaRecord[] = this.trustedCas()): void {
    const pems = cas.map((ca) => this.caKeyPair(ca).certPem.trim());
    writeAtomic(DevCa.paths(this.dir).trustCa, `${pems.join("\n")}\n`, 0o644);
  }

  /**
   * trust/ca.crl: one CRL per trusted CA, each signed by its CA and listing what it revoked, with
   * a fresh nextUpdate. Sidecars require a CRL for every CA in their bundle.
   */
  async writeCrl(nextUpdateDays = 7, cas: readonly CaRecord[] = this.trustedCas()): Promise<string> {
    const pems: string[] = [];
    for (const ca of cas) {
      this.index.crlNumber += 1;
      const pem = await createCrl(this.caKeyPair(ca), {
        number: this.index.crlNumber,
        nextUpdateDays,
        revoked: this.index.issued
          .filter((r) => r.revokedAt !== null && r.caSerial === ca.serial)
          .map((r) => ({ serial: r.serial, revokedAt: new Date(r.revokedAt as string) })),
      });
      pems.push(pem.trim());
    }
    this.saveIndex();
    const text = `${pems.join("\n")}\n`;
    writeAtomic(DevCa.paths(this.dir).trustCrl, text, 0o644);
    return text;
  }
}
