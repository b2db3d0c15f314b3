#if canImport(Glibc)
  import Glibc
#endif

/// A reader's output: bytes appended to a buffer and written to a file descriptor 64 KiB at a
/// time. The formatting helpers write digits straight into it (readers write a line per event:
/// building Strings for them cost more than reading the trace).
public final class ByteOutput {
  private let fd: Int32
  private(set) var bytes: [UInt8] = []
  /// The first error writing, if any (the rest is then discarded).
  public private(set) var failed: Int32?

  public init(fd: Int32) {
    self.fd = fd
    bytes.reserveCapacity(1 << 17)
  }

  deinit { flush() }

  public func append(_ text: String) {
    var text = text
    text.withUTF8 { bytes.append(contentsOf: $0) }
    flushIfFull()
  }

  public func append(_ other: [UInt8]) {
    bytes.append(contentsOf: other)
    flushIfFull()
  }

  func byte(_ value: UInt8) { bytes.append(value) }

  func spaces(_ count: Int) {
    for _ in 0..<max(count, 0) { bytes.append(0x20) }
  }

  /// `value` in decimal, right-aligned in `width` (no sign: callers pass magnitudes).
  func decimal(_ value: Int, width: Int = 0) {
    var digits:
      (
        UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8, UInt8,
        UInt8, UInt8, UInt8, UInt8, UInt8, UInt8
      ) = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
    var count = 0
    var rest = value.magnitude
    withUnsafeMutableBytes(of: &digits) { buffer in
      repeat {
        buffer[count] = UInt8(48 + rest % 10)
        rest /= 10
        count += 1
      } while rest > 0 && count < 20
      spaces(width - count - (value < 0 ? 1 : 0))
      if value < 0 { bytes.append(0x2d) }
      for index in stride(from: count - 1, through: 0, by: -1) { bytes.append(buffer[index]) }
    }
  }

  /// uftrace's duration column, 11 bytes: "   1.234 us" (us below a millisecond, then ms,
  /// then s), as `Render.duration` spells it.
  func duration(_ nanoseconds: Double) {
    let (value, unit): (Double, UInt8) =
      nanoseconds < 1e6
      ? (nanoseconds / 1e3, 0x75) : nanoseconds < 1e9 ? (nanoseconds / 1e6, 0x6d) : (nanoseconds / 1e9, 0x20)
    let thousandths = max(0, Int((value * 1000).rounded()))
    let whole = thousandths / 1000
    let fraction = thousandths % 1000
    var width = 5
    var rest = whole
    while rest >= 10 {
      width += 1
      rest /= 10
    }
    spaces(8 - width)
    decimal(whole)
    bytes.append(0x2e)
    bytes.append(UInt8(48 + fraction / 100))
    bytes.append(UInt8(48 + fraction / 10 % 10))
    bytes.append(UInt8(48 + fraction % 10))
    bytes.append(0x20)
    bytes.append(unit)
    bytes.append(0x73)
  }

  func flushIfFull() { if bytes.count >= 1 << 16 { flush() } }

  public func flush() {
    var done = 0
    while done < bytes.count, failed == nil {
      let count = bytes[done...].withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
      if count < 0 && errno == EINTR { continue }
      if count <= 0 {
        failed = errno
        break
      }
      done += count
    }
    bytes.removeAll(keepingCapacity: true)
  }
}
