// libFuzzer target: the ELF reader (FuzzHarness.elf in TraceryELF says what is read). Built and
// run by scripts/fuzz.sh.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzELF(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
  FuzzHarness.elf(Array(UnsafeBufferPointer(start: data, count: count)))
  return 0
}
