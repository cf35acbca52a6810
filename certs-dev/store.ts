// The development CA on disk. Layout of DIR (default .ashmesh/pki):
//   ca/ca.key, ca/ca.crt, ca/index.json   private: the CA and its record of what it issued
//   trust/ca.crt, trust/ca.crl            public: what every sidecar trusts (mount read-only)
//   <dns-name>/server.crt, server.key     one identity per service
// Every file is written by rename, so a watcher never sees half a file; keys are 0600, certs 0644;
// nothing is overwritten unless the caller says so.
import { X509Certificate } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { createCa, createCrl, type IssueRequest, issueCertificate, type KeyAlgorithm, type KeyPairPem } from "./pki.js";

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
}

export interface CaRecord {
  serial: string;
  subject: string;
  notAfter: string;
  /** "active" signs new certificates; "previous" is still trusted during a CA roll. */
  status: "active" | "previous" | "retired";
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
const RESERVED = new Set(["ca", "trust"]);
const NAME = /^[a-zA-Z0-9_](?:[a-zA-Z0-9_.-]{0,251}[a-zA-Z0-9_])?$/;

/** Writes by rename in the same directory: readers see the old file or the new one, never half. */
export function writeAtomic(path: string, data: string | Buffer, mode: number): void {
  mkdirSync(dirname(path), { recursive: true });
  const tmp = join(dirname(path), `.${Date.now().toString(36)}.${process.pid}.tmp`);
  writeFileSync(tmp, data, { mode });
  chmodSync(tmp, mode);
  renameSync(tmp, path);
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
    const subject = new X509Certificate(ca.certPem).subject.split("\n").reverse().join(",");
    const index: Index = {
      version: 1,
      crlNumber: 0,
      cas: [{ serial: ca.serial, subject, notAfter: ca.notAfter.toISOString(), status: "active" }],
      issued: [],
    };
    const store = new DevCa(dir, index);
    store.saveIndex();
    writeAtomic(p.trustCa, ca.certPem, 0o644);
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
    const index = JSON.parse(text) as Index;
    if (index.version !== 1) throw new CaError(`${p.index}: unknown index version ${String(index.version)}`);
    return new DevCa(dir, index);
  }

  get records(): readonly IssuedRecord[] {
    return this.index.issued;
  }

  get cas(): readonly CaRecord[] {
    return this.index.cas;
  }

  private saveIndex(): void {
    writeAtomic(DevCa.paths(this.dir).index, `${JSON.stringify(this.index, null, 2)}\n`, 0o600);
  }

  /** The signing CA: ca/ca.key and ca/ca.crt. */
  signer(): KeyPairPem {
    const p = DevCa.paths(this.dir);
    return { certPem: readFileSync(p.caCert, "utf8"), keyPem: readFileSync(p.caKey, "utf8") };
  }

  identityFiles(name: string): IdentityFiles {
    const p = DevCa.paths(this.dir);
    const dir = join(this.dir, name);
    return { dir, cert: join(dir, "server.crt"), key: join(dir, "server.key"), ca: p.trustCa, crl: p.trustCrl };
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
    const active = this.index.cas.find((c) => c.status === "active");
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
      caSerial: active?.serial ?? "",
      sha256: issued.fingerprint256,
      revokedAt: null,
      superseded: false,
    };
    this.index.issued.push(record);
    this.saveIndex();
    return record;
  }

  /** Revokes by serial, or every unrevoked certificate of a name; then writes a new CRL. */
  async revoke(nameOrSerial: string): Promise<IssuedRecord[]> {
    const wanted = nameOrSerial.toLowerCase().replace(/^0x/, "").replaceAll(":", "");
    const matches = this.index.issued.filter(
      (r) =>
        r.revokedAt === null && (r.name === nameOrSerial || r.serial.replace(/^0+/, "") === wanted.replace(/^0+/, "")),
    );
    if (matches.length === 0) {
      const known = this.index.issued.some((r) => r.name === nameOrSerial || r.serial === wanted);
      throw new CaError(
        known
          ? `${nameOrSerial}: already revoked`
          : `${nameOrSerial}: no certificate of that name or serial in ${DevCa.paths(this.dir).index}`,
      );
    }
    const now = new Date().toISOString();
    for (const r of matches) r.revokedAt = now;
    this.saveIndex();
    await this.writeCrl();
    return matches;
  }

  /** Signs and writes trust/ca.crl: every revoked certificate of this CA, a fresh nextUpdate. */
  async writeCrl(nextUpdateDays = 7): Promise<string> {
    const active = this.index.cas.find((c) => c.status === "active");
    this.index.crlNumber += 1;
    const pem = await createCrl(this.signer(), {
      number: this.index.crlNumber,
      nextUpdateDays,
      revoked: this.index.issued
        .filter((r) => r.revokedAt !== null && (!active || r.caSerial === active.serial))
        .map((r) => ({ serial: r.serial, revokedAt: new Date(r.revokedAt as string) })),
    });
    this.saveIndex();
    writeAtomic(DevCa.paths(this.dir).trustCrl, pem, 0o644);
    return pem;
  }
}
