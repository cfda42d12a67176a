// Grafana's published dashboard model (npm @grafana/schema, generated from Grafana's CUE schema) as
// JSON spells it: the model's TypeScript enums (FieldColorModeId, ThresholdsMode, MappingType...)
// become the strings they stand for; everything else is the model as published.
import type { Dashboard } from "@grafana/schema";

export type Json<T> = T extends string
  ? `${T}`
  : T extends readonly (infer U)[]
    ? Json<U>[]
    : T extends object
      ? { [K in keyof T]: Json<T[K]> }
      : T;

export type DashboardJson = Json<Dashboard>;
