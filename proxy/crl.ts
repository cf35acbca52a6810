// CRL parsing and signature checks. Node can use a CRL but not read one, so this is the one
// place the proxy loads @peculiar/x509 (lazily: sidecars without a CRL never pay for it).
import "reflect-metadata";
import { webcrypto, type X509Certificate } from "node:crypto";
import * as x509 from "@peculiar/x509";
import { normalizeSerial } from "./identity.js";

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

export interface Crl {
  issuer: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
  revoked: Set<string>;
  crl: x509.X509Crl;
}

export async function parseCrl(pem: string): Promise<Crl> {
  const crl = new x509.X509Crl(pem);
  return {
    issuer: crl.issuer,
    thisUpdate: crl.thisUpdate,
    nextUpdate: crl.nextUpdate ?? null,
    revoked: new Set(crl.entries.map((e) => normalizeSerial(e.serialNumber))),
    crl,
  };
}

/** The CA of `bundle` whose key signed the CRL, or null. */
export async function crlIssuer(parsed: Crl, bundle: readonly X509Certificate[]): Promise<X509Certificate | null> {
  for (const ca of bundle) {
    try {
      const candidate = new x509.X509Certificate(ca.raw);
      if (await parsed.crl.verify({ publicKey: candidate })) return ca;
    } catch {
      // a CA with another key algorithm: not this one
    }
  }
  return null;
}
