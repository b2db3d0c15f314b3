// libFuzzer target: everything TraceryRecord parses from text (FuzzHarness.text in TraceryRecord:
// the input's first byte picks the parser). Built and run by scripts/fuzz.sh.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTexts(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
  FuzzHarness.text(Array(UnsafeBufferPointer(start: data, count: count)))
  return 0
}
