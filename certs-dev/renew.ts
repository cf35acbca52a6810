// Renewal: what is due at a given time (a pure function, tested with a fixed `now`), and the run
// that does it. Certificates are reissued once `threshold` of their lifetime has passed (70 %,
// as the seed asks), which leaves 30 % for a failed run to be noticed and repeated. CRLs are
// re-signed past half of their thisUpdate→nextUpdate window, because a sidecar refuses a CRL
// past its nextUpdate and so would refuse every peer of that CA.
import { X509Certificate } from "node:crypto";
import { readFileSync } from "node:fs";
import { crlSignedBy, parseCrl, pemBlocks } from "../proxy/x509.js";
import { type CaRecord, DevCa, type IssuedRecord, isCurrent } from "./store.js";

export const DEFAULT_THRESHOLD = 0.7;
/** A CRL is re-signed once this share of its window has passed. */
export const CRL_THRESHOLD = 0.5;

/** One CRL found in trust/ca.crl, and the CA whose key signed it. */
export interface CrlState {
  caSerial: string;
  thisUpdate: Date;
  nextUpdate: Date | null;
}

export type Due =
  | { kind: "certificate"; record: IssuedRecord; used: number }
  | { kind: "crl"; ca: CaRecord; reason: string };

/** Share of [from, to] elapsed at `now`: 0 before, 1 and more once over. */
function elapsed(now: Date, from: Date, to: Date): number {
  const span = to.getTime() - from.getTime();
  return span <= 0 ? 1 : (now.getTime() - from.getTime()) / span;
}

/** What is due at `now`: every current certificate past `threshold`, every trusted CA's CRL past half (or missing). */
export function dueAt(
  now: Date,
  state: { records: readonly IssuedRecord[]; cas: readonly CaRecord[]; crls: readonly CrlState[] },
  threshold = DEFAULT_THRESHOLD,
): Due[] {
  const due: Due[] = [];
  for (const record of state.records) {
    if (!isCurrent(record)) continue;
    const used = elapsed(now, new Date(record.notBefore), new Date(record.notAfter));
    if (used >= threshold) due.push({ kind: "certificate", record, used });
  }
  for (const ca of state.cas) {
    if (ca.status === "retired") continue;
    const crl = state.crls.find((c) => c.caSerial === ca.serial);
    if (!crl) {
      due.push({ kind: "crl", ca, reason: "trust/ca.crl has no CRL of this CA" });
    } else if (!crl.nextUpdate) {
      due.push({ kind: "crl", ca, reason: "its CRL has no nextUpdate" });
    } else if (elapsed(now, crl.thisUpdate, crl.nextUpdate) >= CRL_THRESHOLD) {
      due.push({ kind: "crl", ca, reason: `its CRL's nextUpdate is ${crl.nextUpdate.toISOString()}` });
    }
  }
  return due;
}

/** The CRLs in trust/ca.crl, each matched to the CA whose key signed it; unreadable ones are left out (and so re-signed). */
export async function readCrls(ca: DevCa): Promise<CrlState[]> {
  let text: string;
  try {
    text = readFileSync(DevCa.paths(ca.dir).trustCrl, "utf8");
  } catch {
    return [];
  }
  const signers = ca.trustedCas().map((record) => ({
    record,
    cert: new X509Certificate(ca.caKeyPair(record).certPem),
  }));
  const out: CrlState[] = [];
  for (const block of pemBlocks(text, "X509 CRL")) {
    try {
      const crl = await parseCrl(block.der);
      for (const s of signers) {
        if (await crlSignedBy(crl, s.cert)) {
          out.push({ caSerial: s.record.serial, thisUpdate: crl.thisUpdate, nextUpdate: crl.nextUpdate });
          break;
        }
      }
    } catch {
      // does not parse: counts as missing, and the run writes a good one
    }
  }
  return out;
}

const pct = (share: number) => `${Math.floor(share * 100)} %`;

/** Does what is due now; says one line per action as it is done, or one line saying nothing was due. */
export async function renew(
  ca: DevCa,
  options: { threshold?: number; now?: Date } = {},
  say: (line: string) => void = () => {},
): Promise<void> {
  const now = options.now ?? new Date();
  const threshold = options.threshold ?? DEFAULT_THRESHOLD;
  const due = dueAt(now, { records: ca.records, cas: ca.cas, crls: await readCrls(ca) }, threshold);
  for (const d of due) {
    if (d.kind !== "certificate") continue;
    const { previous, record } = await ca.rotate(d.record.name);
    say(
      `renewed ${record.name}: ${pct(d.used)} of its lifetime had passed (valid until ${previous.notAfter.slice(0, 10)}); new serial ${record.serial}, valid until ${record.notAfter.slice(0, 10)}`,
    );
  }
  const crls = due.filter((d) => d.kind === "crl");
  if (crls.length > 0) {
    // One write re-signs every trusted CA's CRL: the file holds them together.
    await ca.writeCrl();
    for (const trusted of ca.trustedCas()) {
      const reason = crls.find((d) => d.ca.serial === trusted.serial)?.reason ?? "written together with the others";
      say(`re-signed the CRL of ${trusted.subject} (serial ${trusted.serial}): ${reason}`);
    }
  }
  if (due.length === 0) {
    say(
      `nothing due: no current certificate is past ${pct(threshold)} of its lifetime, no CRL past half of its window`,
    );
  }
}
