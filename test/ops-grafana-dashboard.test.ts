// The Grafana dashboard is valid JSON with its datasource as a variable, has the panels an
// operator of the mesh looks for, lays them out without overlap, and every query in it parses
// as PromQL in Prometheus's own parser (promtool, with Grafana's variables filled in).
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { stringify } from "yaml";
import { at, dashboard, dashboardQueries, type GrafanaPanel, readYaml, run, tool } from "./lib/ops.js";

const promtool = tool("promtool", "prometheus");
const d = dashboard();
const panels: GrafanaPanel[] = d.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
const visible = panels.filter((p) => p.type !== "row");
/** Grafana's reference to the `datasource` variable (a plain string, not a JS template). */
const DATASOURCE = "$" + "{datasource}";

t.test("the datasource is a variable, used by every panel and query", async (t) => {
  const variable = d.templating.list.find((v) => v.name === "datasource");
  t.equal(variable?.type, "datasource", "a datasource variable");
  t.equal(variable?.query, "prometheus", "of Prometheus datasources");
  for (const p of visible) {
    t.equal(p.datasource?.uid, DATASOURCE, `panel "${p.title}" uses $datasource`);
    for (const target of p.targets ?? []) {
      t.equal(target.datasource?.uid, DATASOURCE, `panel "${p.title}" ${target.refId} uses $datasource`);
    }
  }
  for (const v of d.templating.list.filter((v) => v.type === "query")) {
    t.same(v.datasource, { type: "prometheus", uid: DATASOURCE }, `variable $${v.name} uses $datasource`);
  }
  for (const { where, expr } of dashboardQueries(d)) {
    for (const m of expr.matchAll(/\b(mtls_\w+|process_\w+|up)\{([^}]*)\}/g)) {
      t.match(m[2], /job=~"\$job"/, `${where}: ${m[1]} is filtered by $job`);
      t.match(m[2], /service=~"\$service"/, `${where}: ${m[1]} is filtered by $service`);
    }
  }
});

t.test("panels: ids unique, inside the 24-column grid, no two overlapping", async (t) => {
  const ids = panels.map((p) => p.id);
  t.equal(new Set(ids).size, ids.length, "unique panel ids");
  for (const p of panels) {
    const g = p.gridPos;
    t.ok(g.x >= 0 && g.w > 0 && g.x + g.w <= 24 && g.h > 0 && g.y >= 0, `panel "${p.title}" fits the grid`);
  }
  for (let i = 0; i < panels.length; i++) {
    for (let j = i + 1; j < panels.length; j++) {
      const a = (panels[i] as GrafanaPanel).gridPos;
      const b = (panels[j] as GrafanaPanel).gridPos;
      const overlap = a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
      if (overlap) t.fail(`panels "${panels[i]?.title}" and "${panels[j]?.title}" overlap`);
    }
  }
  t.ok(
    visible.every((p) => (p.targets ?? []).length > 0),
    "every panel has a query",
  );
});

t.test("the panels an operator looks for", async (t) => {
  const queries = dashboardQueries(d).map((q) => q.expr.replace(/\s+/g, " "));
  const has = (what: string, pattern: RegExp) =>
    t.ok(
      queries.some((q) => pattern.test(q)),
      what,
    );
  has("handshakes per second by direction and result", /by \([^)]*direction, result\) \(rate\(mtls_handshake_total/);
  has("handshake failures by reason", /by \([^)]*reason\) \(rate\(mtls_handshake_failures/);
  has("certificate expiry per service", /by \(service, cert[^)]*\) \(mtls_cert_expiry_days/);
  has("request rate per edge (direction, peer)", /by \([^)]*direction, peer\) \(rate\(mtls_requests_total/);
  for (const q of ["0.50", "0.95", "0.99"]) {
    has(
      `latency p${Number(q) * 100} per edge from mtls_request_duration_seconds_bucket`,
      new RegExp(
        `histogram_quantile\\(${q.replace(".", "\\.")}, sum by \\([^)]*direction, peer, le\\) \\(rate\\(mtls_request_duration_seconds_bucket`,
      ),
    );
  }
  has("open connections", /mtls_open_connections/);
  has("revoked connections", /increase\(mtls_revoked_connections/);
  has("certificate reloads by result", /by \([^)]*result\) \(increase\(mtls_cert_reloads_total/);
  has("the 1 % handshake failure ratio", /mtls_handshake_failures[^/]*\/[^/]*mtls_handshake_total/);
  has("sidecars up", /\bup\{/);
  has("restarts", /changes\(process_start_time_seconds/);
});

t.test("every query parses as PromQL (promtool check rules on the queries)", { skip: promtool.skip }, async (t) => {
  const fill = (expr: string) =>
    expr
      .replaceAll("$__rate_interval", "1m")
      .replaceAll("$__range", "6h")
      .replaceAll("$job", "ashmesh")
      .replaceAll("$service", ".*");
  const queries = dashboardQueries(d);
  const rules = queries.map((q, i) => ({ record: `dashboard:query_${i}`, expr: fill(q.expr) }));
  t.ok(
    rules.every((r) => !r.expr.includes("$")),
    "every Grafana variable was filled in",
  );
  const dir = mkdtempSync(join(tmpdir(), "ashmesh-dashboard-"));
  t.teardown(() => rmSync(dir, { recursive: true, force: true }));
  const file = join(dir, "queries.yml");
  writeFileSync(file, stringify({ groups: [{ name: "dashboard", rules }] }));
  const result = await run(promtool.path as string, ["check", "rules", file]);
  t.equal(result.code, 0, `${rules.length} queries parse`, { output: result.output });

  // And a broken query would not.
  writeFileSync(
    file,
    stringify({ groups: [{ name: "d", rules: [{ record: "d:x", expr: "sum by (le (rate(x[1m]))" }] }] }),
  );
  t.not((await run(promtool.path as string, ["check", "rules", file])).code, 0, "a query with a syntax error fails");
});

t.test("provisioning: a Prometheus datasource and a file provider", async (t) => {
  const ds = readYaml<{ apiVersion: number; datasources: Array<{ type: string; url: string; uid: string }> }>(
    at("compose/grafana/provisioning/datasources/prometheus.yml"),
  );
  t.equal(ds.apiVersion, 1);
  t.equal(ds.datasources.length, 1);
  t.equal(ds.datasources[0]?.type, "prometheus");
  t.match(ds.datasources[0]?.url ?? "", /^http:\/\/prometheus\.ashchan\.local:9090$/);
  const provider = readYaml<{
    apiVersion: number;
    providers: Array<{ type: string; options: { path: string } }>;
  }>(at("compose/grafana/provisioning/dashboards/ashmesh.yml"));
  t.equal(provider.apiVersion, 1);
  t.equal(provider.providers[0]?.type, "file");
  t.equal(provider.providers[0]?.options.path, "/var/lib/grafana/dashboards/ashmesh");
  t.equal(d.uid, "ashmesh-mtls", "a fixed uid, so links to the dashboard survive re-provisioning");
});
