// The alert rules load in Prometheus's own checker, every alert has promtool unit tests that fire
// it and keep it quiet, and those tests are sharp: loosening or tightening any threshold,
// dropping a `for:` or silencing an alert in a copy of alerts.yml makes them fail.
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { parseDocument, type YAMLMap, type YAMLSeq } from "yaml";
import { type AlertRule, alertRules, at, pool, readYaml, run, tool } from "./lib/ops.js";

const promtool = tool("promtool", "prometheus");
const ALERTS = at("compose/prometheus/alerts.yml");
const ALERTS_TEST = at("compose/prometheus/alerts.test.yml");
const rules = alertRules();

interface RuleTest {
  alertname: string;
  eval_time: string;
  exp_alerts?: unknown[];
}

const unitTests = readYaml<{ tests: Array<{ name: string; alert_rule_test?: RuleTest[] }> }>(ALERTS_TEST).tests;
const ruleTests = unitTests.flatMap((u) => u.alert_rule_test ?? []);

t.test("alerts.yml names the seed's thresholds and what to do", async (t) => {
  const byName = new Map(rules.map((r) => [r.alert, r]));
  t.equal(byName.size, rules.length, "alert names are unique");
  const want: Record<string, RegExp> = {
    MtlsHandshakeFailuresHigh:
      /rate\(mtls_handshake_failures\[5m\]\)[\s\S]*\/[\s\S]*rate\(mtls_handshake_total\[5m\]\)[\s\S]*> 0\.01/,
    MtlsCertExpiringSoon:
      /^mtls_cert_expiry_days < 30 unless on \(job, instance, cert\) mtls_acme_cert_lifetime_remaining_ratio > 0\.15$/,
    MtlsCertExpiryCritical:
      /^mtls_cert_expiry_days < 7 unless on \(job, instance, cert\) mtls_acme_cert_lifetime_remaining_ratio > 0\.15$/,
    MtlsRevokedConnection: /^increase\(mtls_revoked_connections\[\d+m\]\) > 0$/,
    AshmeshSidecarRestarted: /^changes\(process_start_time_seconds\{job="ashmesh"\}\[\d+m\]\) > 0$/,
    AshmeshSidecarCrashLooping: /changes\(process_start_time_seconds/,
    AshmeshSidecarDown: /^up\{job="ashmesh"\} == 0$/,
    MtlsCertReloadFailed: /mtls_cert_reloads_total\{result="failed"\}/,
    MtlsCrlNextUpdateSoon: /^mtls_crl_next_update_days < /,
    MtlsCrlNextUpdateCritical: /^mtls_crl_next_update_days < /,
    MtlsAcmeRenewalFailing: /^mtls_acme_consecutive_failures > 2$/,
    MtlsAcmeCertNotRenewed: /^max without \(cert\) \(mtls_acme_cert_lifetime_remaining_ratio\) < 0\.1$/,
    MtlsCrlFetchFailing: /^time\(\) - mtls_crl_last_fetch_timestamp_seconds > 3600$/,
  };
  for (const [name, expr] of Object.entries(want)) {
    const rule = byName.get(name);
    if (!rule) {
      t.fail(`alert ${name} is missing`);
      continue;
    }
    t.match(rule.expr.trim(), expr, `${name}: ${rule.expr.trim().replace(/\s+/g, " ")}`);
  }
  for (const rule of rules) {
    t.ok(["warning", "critical"].includes(rule.labels?.severity ?? ""), `${rule.alert}: severity warning or critical`);
    const summary = rule.annotations?.summary ?? "";
    const description = rule.annotations?.description ?? "";
    t.match(summary, /\$labels\.service/, `${rule.alert}: the summary names the service`);
    t.match(summary, /\$labels\.instance/, `${rule.alert}: the summary names the instance`);
    t.match(
      description,
      /`(ashmesh|systemctl|journalctl|curl) [^`]+`/,
      `${rule.alert}: the description gives a command`,
    );
  }
});

t.test("promtool check rules accepts alerts.yml", { skip: promtool.skip }, async (t) => {
  const result = await run(promtool.path as string, ["check", "rules", ALERTS]);
  t.equal(result.code, 0, "promtool check rules exits 0", { output: result.output });
  t.match(result.output, new RegExp(`SUCCESS: ${rules.length} rules found`));
});

t.test("every alert has a firing case and a quiet case in alerts.test.yml", async (t) => {
  const names = new Set(rules.map((r) => r.alert));
  for (const rule of rules) {
    const cases = ruleTests.filter((c) => c.alertname === rule.alert);
    t.ok(
      cases.some((c) => (c.exp_alerts ?? []).length > 0),
      `${rule.alert}: a case where it fires`,
    );
    t.ok(
      cases.some((c) => (c.exp_alerts ?? []).length === 0),
      `${rule.alert}: a case where it stays quiet`,
    );
  }
  // A test of an alert that does not exist passes vacuously when it expects nothing.
  for (const c of ruleTests)
    t.ok(names.has(c.alertname), `alerts.test.yml tests ${c.alertname}, an alert of alerts.yml`);
});

t.test("promtool test rules passes", { skip: promtool.skip }, async (t) => {
  const result = await run(promtool.path as string, ["test", "rules", ALERTS_TEST]);
  t.equal(result.code, 0, "promtool test rules exits 0", { output: result.output });
  t.match(result.output, /SUCCESS/);
});

// --- mutations ------------------------------------------------------------------------------------

interface Mutation {
  alert: string;
  what: string;
  apply(rule: { expr: string; for?: string }): { expr: string; for?: string };
}

const COMPARISON = /(==|!=|>=|<=|>|<)\s*(-?\d+(?:\.\d+)?)(?![\w.])/g;

/** Each comparison with a number, loosened (a near miss must then fire) and tightened (the firing case must stop). */
function thresholdMutations(rule: AlertRule): Mutation[] {
  const out: Mutation[] = [];
  for (const m of rule.expr.matchAll(COMPARISON)) {
    const [whole, op, raw] = m as unknown as [string, string, string];
    const x = Number(raw);
    const at = m.index ?? 0;
    const replace = (next: string) => (r: { expr: string; for?: string }) => ({
      ...r,
      expr: r.expr.slice(0, at) + next + r.expr.slice(at + whole.length),
    });
    const variants: Array<[string, string]> = [];
    if (op === ">") {
      variants.push(["loosened", `>= ${x / 2}`], ["tightened", `> ${x === 0 ? 1 : x * 2}`]);
    } else if (op === "<") {
      variants.push(["loosened", `<= ${x * 1.5}`], ["tightened", `< ${x / 2}`]);
    } else if (op === "==") {
      variants.push(["inverted", `!= ${x}`]);
    } else {
      throw new Error(`${rule.alert}: no mutation for "${whole}"; teach thresholdMutations this operator`);
    }
    for (const [how, next] of variants)
      out.push({ alert: rule.alert, what: `"${whole}" ${how} to "${next}"`, apply: replace(next) });
  }
  return out;
}

function mutations(): Mutation[] {
  const out: Mutation[] = [];
  for (const rule of rules) {
    out.push({ alert: rule.alert, what: "silenced", apply: (r) => ({ ...r, expr: "vector(1) == 0" }) });
    out.push(...thresholdMutations(rule));
    if (rule.for) {
      out.push({
        alert: rule.alert,
        what: `for: ${rule.for} dropped`,
        apply: (r) => {
          const { for: _dropped, ...rest } = r;
          return rest;
        },
      });
    }
  }
  return out;
}

/** alerts.yml with one rule changed, next to a copy of alerts.test.yml, in a fresh directory. */
function mutatedCopy(root: string, index: number, mutation: Mutation): string {
  const dir = join(root, String(index));
  const doc = parseDocument(readFileSync(ALERTS, "utf8"));
  for (const group of (doc.get("groups") as YAMLSeq<YAMLMap>).items) {
    for (const node of (group.get("rules") as YAMLSeq<YAMLMap>).items) {
      if (node.get("alert") !== mutation.alert) continue;
      const before = { expr: String(node.get("expr")), ...(node.has("for") ? { for: String(node.get("for")) } : {}) };
      const after = mutation.apply(before);
      node.set("expr", after.expr);
      if (after.for === undefined) node.delete("for");
    }
  }
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "alerts.yml"), doc.toString());
  copyFileSync(ALERTS_TEST, join(dir, "alerts.test.yml"));
  return dir;
}

t.test(
  "the unit tests catch every loosened or tightened threshold, dropped for: and silenced alert",
  {
    skip: promtool.skip,
  },
  async (t) => {
    const all = mutations();
    for (const rule of rules) {
      t.ok(
        all.some((m) => m.alert === rule.alert && m.what.startsWith('"')),
        `${rule.alert}: its expression compares with a number the mutations can move`,
      );
    }
    const root = mkdtempSync(join(tmpdir(), "ashmesh-alert-mutations-"));
    t.teardown(() => rmSync(root, { recursive: true, force: true }));

    // The unchanged copy passes: a failure below is the mutation's doing, not the copying's.
    const control = mutatedCopy(root, -1, { alert: "", what: "none", apply: (r) => r });
    const baseline = await run(promtool.path as string, ["test", "rules", join(control, "alerts.test.yml")]);
    t.equal(baseline.code, 0, `the unmutated copy passes: ${baseline.output}`);

    const results = await pool(all, 4, async (mutation) => {
      const dir = mutatedCopy(root, all.indexOf(mutation), mutation);
      // The mutated rules must still be valid: a mutation that breaks the syntax proves nothing.
      const check = await run(promtool.path as string, ["check", "rules", join(dir, "alerts.yml")]);
      const test = await run(promtool.path as string, ["test", "rules", join(dir, "alerts.test.yml")]);
      return { mutation, check, test };
    });
    for (const { mutation, check, test } of results) {
      const name = `${mutation.alert}: ${mutation.what}`;
      t.equal(check.code, 0, `${name}: the mutated rules are valid (${check.output.trim().split("\n").pop()})`);
      t.not(test.code, 0, `${name}: promtool test rules fails`);
      t.match(test.output, `alertname: ${mutation.alert},`, `${name}: the failure is about ${mutation.alert}`);
    }
  },
);
