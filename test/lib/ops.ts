// Helpers for the tests of the operations files (compose/prometheus, compose/grafana,
// compose/systemd): find and run the real tools (promtool, systemd-analyze), and read metric
// names out of PromQL and out of Prometheus text.
import { accessSync, constants, readFileSync } from "node:fs";
import { delimiter, join } from "node:path";
import { parse as parseYaml } from "yaml";
import { ROOT, type RunOptions, run as runCommand } from "./run.js";

export { ROOT };
export const at = (...parts: string[]) => join(ROOT, ...parts);

/** The absolute path of an executable on PATH, or null. */
export function which(name: string): string | null {
  for (const dir of (process.env.PATH ?? "").split(delimiter)) {
    if (!dir) continue;
    const candidate = join(dir, name);
    try {
      accessSync(candidate, constants.X_OK);
      return candidate;
    } catch {
      // not here
    }
  }
  return null;
}

export interface Tool {
  path: string | null;
  /** tap's `skip` option: a reason when the tool is absent, false when it is there. */
  skip: string | false;
}

/**
 * A real tool the tests need. Absent, the tests that use it are skipped with a message that
 * says how to install it, unless ASHMESH_REQUIRE_OPS_TOOLS=1 (CI), where they fail instead.
 */
export function tool(name: string, aptPackage: string): Tool {
  const path = which(name);
  if (path) return { path, skip: false };
  const why = `${name} is not on PATH: install it (apt-get install ${aptPackage}) to run this check`;
  if (process.env.ASHMESH_REQUIRE_OPS_TOOLS === "1") throw new Error(`${why} (ASHMESH_REQUIRE_OPS_TOOLS=1)`);
  return { path: null, skip: why };
}

export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
  /** stdout and stderr together, for messages. */
  output: string;
}

/** lib/run.ts's `run`, its output under the names these tests use and also together. */
export async function run(command: string, args: string[], options: RunOptions = {}): Promise<RunResult> {
  const { code, out, err } = await runCommand(command, args, options);
  return { code, stdout: out, stderr: err, output: `${out}${err}` };
}

/** Runs `fn` over `items` with at most `limit` at a time, results in order. */
export async function pool<T, R>(items: readonly T[], limit: number, fn: (item: T) => Promise<R>): Promise<R[]> {
  const results: R[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      results[i] = await fn(items[i] as T);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

// --- Prometheus rules ----------------------------------------------------------------------------

export interface AlertRule {
  alert: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

export function readYaml<T = unknown>(path: string): T {
  return parseYaml(readFileSync(path, "utf8")) as T;
}

export function alertRules(path = at("compose/prometheus/alerts.yml")): AlertRule[] {
  const doc = readYaml<{ groups: Array<{ rules: Array<AlertRule & { record?: string }> }> }>(path);
  return doc.groups.flatMap((g) => g.rules.filter((r) => r.alert));
}

// --- PromQL: metric names ------------------------------------------------------------------------

const PROMQL_WORDS = new Set([
  "by",
  "without",
  "on",
  "ignoring",
  "group_left",
  "group_right",
  "and",
  "or",
  "unless",
  "bool",
  "offset",
  "atan2",
  "inf",
  "nan",
]);

/**
 * The metric names a PromQL expression selects. Strings, label matchers, label lists of
 * by/without/on/ignoring/group_*, range and subquery brackets, Grafana variables ($x, ${x},
 * [[x]]) and function names (an identifier followed by "(") are not metric names.
 */
export function metricNames(expr: string): string[] {
  const text = expr
    .replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""')
    .replace(/\{[^}]*\}/g, " ")
    .replace(/\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)/g, " ")
    .replace(/\[[^\]]*\]/g, " ")
    .replace(/\$\{[^}]*\}|\$\w+/g, " ")
    .replace(/\b\d+(\.\d+)?(e[+-]?\d+)?[smhdwy]?\b/gi, " ");
  const names = new Set<string>();
  for (const m of text.matchAll(/([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?/g)) {
    const [, name, call] = m;
    if (!name || call || PROMQL_WORDS.has(name.toLowerCase())) continue;
    names.add(name);
  }
  return [...names];
}

/** Grafana's label_values(metric{...}, label): the metric, or null for label_values(label). */
export function labelValuesMetric(query: string): string | null {
  const m = /label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?\s*,/.exec(query);
  return m?.[1] ?? null;
}

// --- Prometheus text format ----------------------------------------------------------------------

export interface Exposition {
  /** Every sample name that appears in the text. */
  samples: Set<string>;
  /** Family name -> type from `# TYPE`. */
  types: Map<string, string>;
}

export function parseExposition(text: string): Exposition {
  const samples = new Set<string>();
  const types = new Map<string, string>();
  for (const line of text.split("\n")) {
    const type = /^# TYPE (\S+) (\S+)/.exec(line);
    if (type) types.set(type[1] as string, type[2] as string);
    else if (line && !line.startsWith("#")) {
      const name = /^([a-zA-Z_:][a-zA-Z0-9_:]*)/.exec(line)?.[1];
      if (name) samples.add(name);
    }
  }
  return { samples, types };
}

/** Names a query may use for what the text declares: histogram and summary families add their series. */
export function queryableNames(e: Exposition): Set<string> {
  const names = new Set<string>(e.samples);
  for (const [family, type] of e.types) {
    if (type === "histogram") for (const s of ["_bucket", "_sum", "_count"]) names.add(family + s);
    else if (type === "summary") for (const s of ["", "_sum", "_count"]) names.add(family + s);
    else names.add(family);
  }
  return names;
}

/** Series Prometheus makes itself for every target, not the sidecar. */
export const SCRAPE_SERIES = new Set(["up", "scrape_duration_seconds", "scrape_samples_scraped"]);

// --- Grafana -------------------------------------------------------------------------------------

export interface GrafanaPanel {
  id: number;
  type: string;
  title: string;
  datasource?: { type?: string; uid?: string };
  gridPos: { h: number; w: number; x: number; y: number };
  targets?: Array<{ expr?: string; refId?: string; datasource?: { type?: string; uid?: string } }>;
  panels?: GrafanaPanel[];
}

export interface GrafanaDashboard {
  uid: string;
  title: string;
  panels: GrafanaPanel[];
  templating: { list: Array<{ name: string; type: string; query?: unknown; datasource?: unknown }> };
  annotations?: { list: Array<{ expr?: string; datasource?: { uid?: string } }> };
}

export function dashboard(path = at("compose/grafana/dashboard.json")): GrafanaDashboard {
  return JSON.parse(readFileSync(path, "utf8")) as GrafanaDashboard;
}

/** Every PromQL expression of the dashboard: panel targets, annotations, template queries. */
export function dashboardQueries(d: GrafanaDashboard): Array<{ where: string; expr: string }> {
  const out: Array<{ where: string; expr: string }> = [];
  const walk = (panels: GrafanaPanel[]) => {
    for (const p of panels) {
      for (const t of p.targets ?? []) if (t.expr) out.push({ where: `panel "${p.title}" ${t.refId}`, expr: t.expr });
      if (p.panels) walk(p.panels);
    }
  };
  walk(d.panels);
  for (const a of d.annotations?.list ?? []) if (a.expr) out.push({ where: "annotation", expr: a.expr });
  return out;
}

/** The metrics the dashboard's template variables query (label_values(metric, label)). */
export function dashboardVariableMetrics(d: GrafanaDashboard): Array<{ where: string; metric: string }> {
  const out: Array<{ where: string; metric: string }> = [];
  for (const v of d.templating.list) {
    if (v.type !== "query") continue;
    const q = typeof v.query === "string" ? v.query : ((v.query as { query?: string } | undefined)?.query ?? "");
    const metric = labelValuesMetric(q);
    if (metric) out.push({ where: `variable $${v.name}`, metric });
  }
  return out;
}

// --- systemd -------------------------------------------------------------------------------------

/** A unit file as section -> key -> values (a key may repeat; an empty value stays ""). */
export type Unit = Map<string, Map<string, string[]>>;

export function parseUnit(text: string): Unit {
  const unit: Unit = new Map();
  let section: Map<string, string[]> | null = null;
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || line.startsWith(";")) continue;
    const header = /^\[(.+)\]$/.exec(line);
    if (header) {
      section = new Map();
      unit.set(header[1] as string, section);
      continue;
    }
    const eq = line.indexOf("=");
    if (!section || eq < 0) throw new Error(`not a unit file line: ${raw}`);
    const key = line.slice(0, eq).trim();
    const values = section.get(key) ?? [];
    values.push(line.slice(eq + 1).trim());
    section.set(key, values);
  }
  return unit;
}

/** The last value of a key (systemd's rule for single-valued settings), or undefined. */
export function unitValue(unit: Unit, section: string, key: string): string | undefined {
  return unit.get(section)?.get(key)?.at(-1);
}

export function unitValues(unit: Unit, section: string, key: string): string[] {
  return unit.get(section)?.get(key) ?? [];
}

/** A systemd time span ("25s", "5min", "1h", "500ms", "90") in milliseconds. */
export function timeSpanMs(value: string): number {
  const units: Record<string, number> = {
    ms: 1,
    s: 1000,
    sec: 1000,
    m: 60_000,
    min: 60_000,
    h: 3_600_000,
    d: 86_400_000,
  };
  let total = 0;
  const re = /(\d+(?:\.\d+)?)\s*([a-z]*)/g;
  for (const m of value.trim().matchAll(re)) {
    const factor = units[m[2] || "s"];
    if (factor === undefined) throw new Error(`unknown time unit in "${value}"`);
    total += Number(m[1]) * factor;
  }
  return total;
}

/** An environment file as systemd reads it: KEY=VALUE lines, # comments; no expansion. */
export function parseEnvFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const raw of text.split("\n")) {
    const line = raw.trim();
    if (!line || line.startsWith("#") || line.startsWith(";")) continue;
    const m = /^([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (!m) throw new Error(`not an environment file line: ${raw}`);
    let value = (m[2] as string).trim();
    if (/^".*"$|^'.*'$/.test(value)) value = value.slice(1, -1);
    env[m[1] as string] = value;
  }
  return env;
}
