"""The gRPC edge: where protobuf and gRPC end and the gateway's own values begin.

servicer    authentication, decoding, the request context (deadline, key); calls `sending`
streams     a stream's reading, idle timeout and end (half-close or cut off), and its results
observer    the interceptor: request ids, grpc_server_* metrics, one access line per RPC
convert     protobuf <-> Braze JSON and results; with `servicer`, the users of generated code
status      whole-RPC failures -> gRPC status with google.rpc details
admission   how many streams a tenant, and the gateway, may hold open; RPCs in flight
reflection  server reflection under grpc.reflection.v1 and v1alpha
"""
