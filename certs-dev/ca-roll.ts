// CA rotation without a failed request, in three phases the operator runs one after the other,
// waiting between them until every sidecar has reloaded:
//   begin   a new CA; trust/ca.crt = old + new, trust/ca.crl = one CRL each; the old CA still signs.
//           Peers must trust the new CA before anyone presents a certificate it signed.
//   switch  the new CA signs; every current service certificate is reissued by it. Peers still
//           trust the old CA, so certificates not yet reloaded keep working.
//   finish  trust/ca.crt and ca.crl hold the new CA only; the old one is retired. Safe only
//           once every sidecar presents a certificate of the new CA.
// The phase is read from the CA statuses in the index, so each phase can refuse to run out of order.
import { X509Certificate } from "node:crypto";
import { existsSync, readFileSync } from "node:fs";
import { dirname } from "node:path";
import { commonName, subjectOf } from "../proxy/x509.js";
import { createCa, type KeyPairPem, keyAlgorithm } from "./pki.js";
import { CaError, type CaRecord, DevCa, isCurrent, writeAtomic } from "./store.js";

export type RollPhase = "none" | "begun" | "switched";
export const PHASES = ["begin", "switch", "finish"] as const;
export type Phase = (typeof PHASES)[number];

/** Where a roll stands: "begun" while a next CA waits, "switched" while a previous CA is still trusted. */
export function rollPhase(cas: readonly CaRecord[]): RollPhase {
  if (cas.some((c) => c.status === "next")) return "begun";
  if (cas.some((c) => c.status === "previous")) return "switched";
  return "none";
}

const command = (dir: string, phase: Phase) => `ashmesh certs rotate ca --phase ${phase} --dir ${dir}`;

/** The operator's next step, for messages: what comes after the phase the index shows. */
export function nextStep(dir: string, phase: RollPhase): string {
  switch (phase) {
    case "none":
      return `no CA roll is in progress; start one with \`${command(dir, "begin")}\``;
    case "begun":
      return `phase begin is done; the next phase is switch: \`${command(dir, "switch")}\``;
    case "switched":
      return `phase switch is done; the next phase is finish: \`${command(dir, "finish")}\``;
  }
}

function statusCheck(what: string): string {
  return `  for each sidecar: curl -s http://ADMIN/status | jq -r '${what}'`;
}

/** Keeps a copy of a CA in ca/<serial>/; an existing copy must be the same, never replaced. */
function keep(serial: string, files: { key: string; cert: string }, pair: KeyPairPem): void {
  for (const [path, pem, mode] of [
    [files.key, pair.keyPem, 0o600],
    [files.cert, pair.certPem, 0o644],
  ] as const) {
    if (!existsSync(path)) writeAtomic(path, pem, mode);
    else if (readFileSync(path, "utf8") !== pem) {
      throw new CaError(`${path} exists and is not CA ${serial}'s; move it away and run again`);
    }
  }
}

export type Say = (line: string) => void;

export async function begin(ca: DevCa, options: { days?: number } = {}, say: Say = () => {}): Promise<void> {
  const phase = rollPhase(ca.cas);
  if (phase !== "none") throw new CaError(`a CA roll is already in progress: ${nextStep(ca.dir, phase)}`);
  const old = ca.active;
  const oldPair = ca.signer();
  const kept = ca.caFiles({ serial: old.serial, status: "previous" });
  keep(old.serial, kept, oldPair);
  const name = commonName(new X509Certificate(oldPair.certPem)) ?? "ashchan-ca";
  // Same CN, another OU: two CAs of one name would make the bundle, the CRLs and /status
  // ambiguous to read (and leave chain building to key identifiers alone).
  const created = await createCa({
    commonName: name,
    unit: `generation ${ca.cas.length + 1}`,
    days: options.days ?? 3650,
    algorithm: keyAlgorithm(oldPair.keyPem),
  });
  const next: CaRecord = {
    serial: created.serial,
    subject: subjectOf(new X509Certificate(created.certPem)),
    notAfter: created.notAfter.toISOString(),
    status: "next",
  };
  const files = ca.caFiles(next);
  writeAtomic(files.key, created.keyPem, 0o600);
  writeAtomic(files.cert, created.certPem, 0o644);
  // The CRL before the bundle, and both before the index: an interrupted begin leaves the index
  // saying "no roll", and running begin again replaces both files.
  await ca.writeCrl(7, [old, next]);
  ca.writeTrust([old, next]);
  ca.update((index) => index.cas.push(next));
  const p = DevCa.paths(ca.dir);
  for (const line of [
    `CA roll, phase 1 of 3 (begin) done.`,
    `  new CA:  ${next.subject}, serial ${next.serial}, valid until ${next.notAfter.slice(0, 10)} (${files.key}, ${files.cert})`,
    `  old CA:  ${old.subject}, serial ${old.serial}: still signs; a copy is kept in ${dirname(kept.key)}/`,
    `  ${p.trustCa}: both CAs; ${p.trustCrl}: one CRL for each`,
    `Before the next phase, wait until every sidecar trusts both CAs (sidecars that watch their files reload`,
    `within a second; send SIGHUP to others): /status lists serials ${old.serial} and ${next.serial}:`,
    statusCheck(".identity.ca[].serial"),
    `Then run: ${command(ca.dir, "switch")}`,
  ])
    say(line);
}

export async function switchCa(ca: DevCa, say: Say = () => {}): Promise<void> {
  const phase = rollPhase(ca.cas);
  if (phase === "none") throw new CaError(`cannot switch: ${nextStep(ca.dir, phase)}`);
  if (phase === "begun") {
    const next = ca.cas.find((c) => c.status === "next") as CaRecord;
    const old = ca.active;
    const pair = ca.caKeyPair(next);
    const p = DevCa.paths(ca.dir);
    // ca/ca.* first, then the index. If this stops in between, signer() sees that the files are
    // not the index's active CA and refuses to sign until this phase runs again.
    writeAtomic(p.caKey, pair.keyPem, 0o600);
    writeAtomic(p.caCert, pair.certPem, 0o644);
    ca.update((index) => {
      for (const c of index.cas) {
        if (c.serial === old.serial) c.status = "previous";
        if (c.serial === next.serial) c.status = "active";
      }
    });
    say(`CA roll, phase 2 of 3 (switch): the new CA signs from now on (${next.subject}, serial ${next.serial}).`);
  }
  const active = ca.active;
  const pending = ca.records.filter((r) => isCurrent(r) && r.caSerial !== active.serial);
  if (phase === "switched") {
    if (pending.length === 0) throw new CaError(`cannot switch again: ${nextStep(ca.dir, "switched")}`);
    say(`CA roll, phase 2 of 3 (switch), again: ${pending.length} certificate(s) still to reissue.`);
  }
  for (const r of pending) {
    const { previous, record } = await ca.rotate(r.name);
    say(`  reissued ${record.name}: serial ${previous.serial} → ${record.serial} (new CA)`);
  }
  for (const line of [
    `Before the next phase, wait until every sidecar presents a certificate of the new CA: /status shows`,
    `issuer ${active.subject}:`,
    statusCheck(".identity.server.issuer, .identity.server.serial"),
    `Then run: ${command(ca.dir, "finish")}`,
  ])
    say(line);
}

export async function finish(ca: DevCa, say: Say = () => {}): Promise<void> {
  const phase = rollPhase(ca.cas);
  if (phase === "none") throw new CaError(`cannot finish: ${nextStep(ca.dir, phase)}`);
  if (phase === "begun") {
    throw new CaError(`cannot finish yet: phase switch comes first: \`${command(ca.dir, "switch")}\``);
  }
  const active = ca.active;
  const pending = ca.records.filter((r) => isCurrent(r) && r.caSerial !== active.serial);
  if (pending.length > 0) {
    throw new CaError(
      `${pending.map((r) => r.name).join(", ")}: still signed by the old CA, whose trust finish would end; run \`${command(ca.dir, "switch")}\` again to reissue them`,
    );
  }
  const previous = ca.cas.filter((c) => c.status === "previous");
  // The bundle first, then the CRL, and the index last, so that an interrupted finish can run again.
  ca.writeTrust([active]);
  await ca.writeCrl(7, [active]);
  ca.update((index) => {
    for (const c of index.cas) if (c.status === "previous") c.status = "retired";
  });
  const p = DevCa.paths(ca.dir);
  for (const line of [
    `CA roll, phase 3 of 3 (finish) done.`,
    `  ${p.trustCa} and ${p.trustCrl}: the new CA only (${active.subject}, serial ${active.serial})`,
    ...previous.map(
      (c) =>
        `  retired ${c.subject}, serial ${c.serial}: certificates it signed are no longer trusted; its key stays in ${ca.caFiles(c).key} until you delete it`,
    ),
    `Wait until every sidecar trusts only the new CA: /status lists serial ${active.serial} alone:`,
    statusCheck(".identity.ca[].serial"),
    `Then the roll is complete.`,
  ])
    say(line);
}
