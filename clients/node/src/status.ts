// The rich error model of a failed RPC: the gateway puts a google.rpc.Status in the
// `grpc-status-details-bin` trailer, its `details` holding google.rpc.BadRequest (invalid input)
// or google.rpc.ErrorInfo (a draining gateway). google/rpc/status.proto is not among the protos
// the client is generated from, so the two small messages it needs are read here by hand; the
// details themselves decode with the generated types.
import { BinaryReader, WireType } from "@bufbuild/protobuf/wire";
import type { ServiceError } from "@grpc/grpc-js";

/** google.protobuf.Any: a serialized message and the URL naming its type. */
export interface Any {
  typeUrl: string;
  value: Uint8Array;
}

/** google.rpc.Status: `code` is a google.rpc.Code, `details` are packed error details. */
export interface RpcStatus {
  code: number;
  message: string;
  details: Any[];
}

/** A generated message type, e.g. BadRequest or ErrorInfo from gen/google/rpc/error_details. */
export interface Decoder<T> {
  decode(input: Uint8Array): T;
}

/** decodeStatus reads a serialized google.rpc.Status (fields 1 code, 2 message, 3 details). */
export function decodeStatus(bytes: Uint8Array): RpcStatus {
  const reader = new BinaryReader(bytes);
  const status: RpcStatus = { code: 0, message: "", details: [] };
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.Varint) {
      status.code = reader.int32();
    } else if (field === 2 && wireType === WireType.LengthDelimited) {
      status.message = reader.string();
    } else if (field === 3 && wireType === WireType.LengthDelimited) {
      status.details.push(decodeAny(reader.bytes()));
    } else {
      reader.skip(wireType, field);
    }
  }
  return status;
}

function decodeAny(bytes: Uint8Array): Any {
  const reader = new BinaryReader(bytes);
  const any: Any = { typeUrl: "", value: new Uint8Array() };
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    if (field === 1 && wireType === WireType.LengthDelimited) {
      any.typeUrl = reader.string();
    } else if (field === 2 && wireType === WireType.LengthDelimited) {
      any.value = reader.bytes();
    } else {
      reader.skip(wireType, field);
    }
  }
  return any;
}

/** rpcStatus returns the google.rpc.Status a failed call carries, if any. */
export function rpcStatus(error: ServiceError): RpcStatus | undefined {
  const [bin] = error.metadata?.get("grpc-status-details-bin") ?? [];
  return bin instanceof Uint8Array ? decodeStatus(bin) : undefined;
}

/**
 * errorDetail returns the first detail of a failed call whose type is `typeName` (the
 * fully-qualified proto name, e.g. "google.rpc.BadRequest"), decoded with `type`.
 */
export function errorDetail<T>(error: ServiceError, typeName: string, type: Decoder<T>): T | undefined {
  const any = rpcStatus(error)?.details.find((d) => d.typeUrl.endsWith(`/${typeName}`));
  return any === undefined ? undefined : type.decode(any.value);
}
