"""The gRPC edge: where protobuf and gRPC end and the gateway's own values begin.

servicer    authentication, decoding, stream reading, deadlines; calls `sending`
observer    the interceptor: request ids, grpc_server_* metrics, one access line per RPC
convert     protobuf <-> Braze JSON and results; with `servicer`, the users of generated code
status      whole-RPC failures -> gRPC status with google.rpc details
admission   how many streams a tenant, and the gateway, may hold open
reflection  server reflection under grpc.reflection.v1 and v1alpha
"""
