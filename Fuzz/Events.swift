// libFuzzer target: a thread's event file, read through the readers' path (FuzzHarness.eventFile
// in TraceryRecord says how the input becomes a file). Built and run by scripts/fuzz.sh.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzEvents(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
  _ = FuzzHarness.eventFile(Array(UnsafeBufferPointer(start: data, count: count)))
  return 0
}
