/// Argument and return-value recording: the specs of uftrace's `-A` / `-R` and the data events
/// that carry the values (docs/trace-format.md).
///
///     -A 'PATTERN@arg1,arg2/x,arg3/s'     integer arguments 1-6 (rdi rsi rdx rcx r8 r9)
///     -R 'PATTERN@retval/d'               the integer return value (rax)
///
/// Formats: d signed decimal (the default), u unsigned, x hex, s a C string (read with
/// `process_vm_readv`, so a bad pointer shows as an error, never a crash; 64 bytes at most).
public struct ValueSpec: Sendable, Equatable {
  public enum Format: UInt8, Sendable {
    case signed = 0x64  // d
    case unsigned = 0x75  // u
    case hex = 0x78  // x
    case string = 0x73  // s
  }

  /// One value to record: `source` 1-6 is argument N, 0 the return value.
  public struct Item: Sendable, Equatable {
    public let source: Int
    public let format: Format

    public init(source: Int, format: Format) {
      self.source = source
      self.format = format
    }
  }

  public let pattern: String
  public let items: [Item]

  /// Parses `-A` (`returnValue` false) or `-R` text.
  public init(parsing text: String, returnValue: Bool) throws(TraceError) {
    let option = returnValue ? "-R" : "-A"
    guard let at = text.lastIndex(of: "@"), at != text.startIndex else {
      throw .corrupt("\(option) '\(text)': expected PATTERN@\(returnValue ? "retval" : "arg1,arg2,...")")
    }
    pattern = String(text[..<at])
    var items: [Item] = []
    for field in text[text.index(after: at)...].split(separator: ",", omittingEmptySubsequences: false) {
      let parts = field.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
      let name = parts[0]
      let source: Int?
      if returnValue {
        source = name == "retval" ? 0 : nil
      } else if name.hasPrefix("arg"), let number = Int(name.dropFirst(3)), (1...6).contains(number) {
        source = number
      } else {
        source = nil
      }
      guard let source else {
        throw .corrupt(
          "\(option) '\(text)': '\(name)' is not \(returnValue ? "retval" : "arg1 ... arg6 (integer arguments)")")
      }
      var format = Format.signed
      if parts.count == 2 {
        guard parts[1].utf8.count == 1, let parsed = Format(rawValue: parts[1].utf8.first!) else {
          throw .corrupt("\(option) '\(text)': format '\(parts[1])' is not d, u, x or s")
        }
        format = parsed
      }
      items.append(Item(source: source, format: format))
    }
    self.items = items
  }
}

/// One recorded value, decoded.
public struct RecordedValue: Sendable, Equatable {
  /// 1-6: argument N; 0: the return value.
  public let source: Int
  public let format: ValueSpec.Format
  /// The register's value (for a string: the pointer).
  public let integer: UInt64
  /// A string's bytes (nil: not a string, or it could not be read).
  public let string: [UInt8]?
  /// The string went on past the bytes kept.
  public let truncated: Bool

  public init(source: Int, format: ValueSpec.Format, integer: UInt64, string: [UInt8]?, truncated: Bool) {
    self.source = source
    self.format = format
    self.integer = integer
    self.string = string
    self.truncated = truncated
  }

  /// As uftrace shows it: `-3`, `42`, `0x2a`, `"text"`, `"tex"...`.
  public var text: String {
    switch format {
    case .signed: return String(Int64(bitPattern: integer))
    case .unsigned: return String(integer)
    case .hex: return "0x" + String(integer, radix: 16)
    case .string:
      guard let string else { return integer == 0 ? "(null)" : "<bad address 0x\(String(integer, radix: 16))>" }
      var quoted = "\""
      for byte in string {
        switch byte {
        case 0x22: quoted += "\\\""
        case 0x5c: quoted += "\\\\"
        case 0x0a: quoted += "\\n"
        case 0x09: quoted += "\\t"
        case 0x20..<0x7f: quoted.unicodeScalars.append(Unicode.Scalar(byte))
        default: quoted += "\\x" + String(byte, radix: 16).leftPadded(to: 2)
        }
      }
      return quoted + (truncated ? "\"..." : "\"")
    }
  }
}

/// The data event that follows an entry (its arguments) or an exit (its return value):
///
///     word 0: 3 << 62 | payload bytes (the words after word 0)
///     per value: a word  format (bits 0-7) | source (8-15) | string bytes (16-31) | flags (32-39:
///                1 string truncated, 2 string unreadable),
///                then the value (8 bytes), then a string's bytes padded to 8
public enum DataEvent {
  public static let maximumString = 64
  static let truncatedFlag: UInt64 = 1
  static let unreadableFlag: UInt64 = 2

  /// Bytes of the event for these values (strings of these lengths).
  public static func size(stringLengths: [Int]) -> Int {
    8 + stringLengths.reduce(0) { $0 + 16 + ($1 + 7) / 8 * 8 }
  }

  /// Writes one value at `pointer`; returns the bytes written.
  public static func write(
    _ item: ValueSpec.Item, integer: UInt64, string: UnsafeRawBufferPointer?, truncated: Bool,
    to pointer: UnsafeMutableRawPointer
  ) -> Int {
    let length = string?.count ?? 0
    var flags: UInt64 = truncated ? truncatedFlag : 0
    if item.format == .string && string == nil { flags |= unreadableFlag }
    let head = UInt64(item.format.rawValue) | UInt64(item.source) << 8 | UInt64(length) << 16 | flags << 32
    pointer.storeBytes(of: head.littleEndian, as: UInt64.self)
    pointer.storeBytes(of: integer.littleEndian, toByteOffset: 8, as: UInt64.self)
    if let string, length > 0 {
      let padded = (length + 7) / 8 * 8
      (pointer + 16).initializeMemory(as: UInt8.self, repeating: 0, count: padded)
      (pointer + 16).copyMemory(from: string.baseAddress!, byteCount: length)
    }
    return 16 + (length + 7) / 8 * 8
  }

  /// The event's first word for a payload of `bytes`.
  public static func header(payload bytes: Int) -> UInt64 { 3 << 62 | UInt64(bytes) }

  /// Decodes a payload; nil when it is malformed.
  static func values(_ load: (Int) -> UInt64?, byteAt: (Int) -> UInt8?, payload: Int) -> [RecordedValue]? {
    var values: [RecordedValue] = []
    var offset = 0
    while offset < payload {
      guard offset + 16 <= payload, let head = load(offset), let integer = load(offset + 8),
        let format = ValueSpec.Format(rawValue: UInt8(head & 0xff))
      else { return nil }
      let source = Int((head >> 8) & 0xff)
      let length = Int((head >> 16) & 0xffff)
      let flags = head >> 32
      guard length <= maximumString, offset + 16 + length <= payload else { return nil }
      var string: [UInt8]?
      if format == .string && flags & unreadableFlag == 0 {
        var bytes: [UInt8] = []
        for index in 0..<length {
          guard let byte = byteAt(offset + 16 + index) else { return nil }
          bytes.append(byte)
        }
        string = bytes
      }
      values.append(
        RecordedValue(
          source: source, format: format, integer: integer, string: string, truncated: flags & truncatedFlag != 0))
      offset += 16 + (length + 7) / 8 * 8
    }
    return values
  }
}
