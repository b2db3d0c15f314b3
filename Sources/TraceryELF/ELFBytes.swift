/// The bytes of one ELF object and the only place that loads integers from them.
///
/// Invariant: every load is bounds-checked against `count`; callers validate table ranges once
/// (in `ELFFile.init`) and then read entries inside them. A load outside the bytes is a
/// programmer error and traps, it never reads out of bounds.
struct ELFBytes: Sendable {
  let storage: [UInt8]

  var count: Int { storage.count }

  func contains(offset: UInt64, size: UInt64) -> Bool {
    let (end, overflow) = offset.addingReportingOverflow(size)
    return !overflow && end <= UInt64(storage.count)
  }

  @inline(__always)
  func load<T: FixedWidthInteger>(_ offset: Int, as type: T.Type) -> T {
    precondition(offset >= 0 && offset + MemoryLayout<T>.size <= storage.count, "ELF load out of bounds")
    return storage.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
  }

  func u8(_ offset: Int) -> UInt8 { load(offset, as: UInt8.self) }
  func u16(_ offset: Int) -> UInt16 { load(offset, as: UInt16.self) }
  func u32(_ offset: Int) -> UInt32 { load(offset, as: UInt32.self) }
  func u64(_ offset: Int) -> UInt64 { load(offset, as: UInt64.self) }

  /// The NUL-terminated string at `offset` inside `[tableStart, tableEnd)`, or nil if it is not
  /// terminated inside the table.
  func cString(at offset: Int, tableStart: Int, tableEnd: Int) -> String? {
    guard offset >= tableStart, offset < tableEnd, tableEnd <= storage.count else { return nil }
    return storage.withUnsafeBufferPointer { buffer -> String? in
      var end = offset
      while end < tableEnd && buffer[end] != 0 { end += 1 }
      guard end < tableEnd else { return nil }
      return String(decoding: UnsafeBufferPointer(rebasing: buffer[offset..<end]), as: UTF8.self)
    }
  }
}
