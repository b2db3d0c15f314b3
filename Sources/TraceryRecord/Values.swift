/// Argument and return-value recording: the specs of uftrace's `-A` / `-R` and the data events
/// that carry the values (docs/trace-format.md).
///
///     -A 'PATTERN@arg1,arg2/x,arg3/s'     integer arguments 1-6 (rdi rsi rdx rcx r8 r9)
///     -A 'PATTERN@fparg1,fparg2/f32'      floating-point arguments 1-8 (xmm0-7)
///     -R 'PATTERN@retval/d32'             the return value (rax; with /f, xmm0)
///
/// Formats: d (or i) signed decimal (the default), u unsigned, x hex, c a character, s a C string
/// (read with `process_vm_readv`, so a bad pointer shows as an error, never a crash; 64 bytes at
/// most), f floating point (the default of fpargN). d, i, u and x take a size in bits, 8, 16, 32
/// or 64 (the default): `arg1/d32` shows an `int` as one, `retval/u8` a `bool` or `unsigned
/// char`; f takes 32 (`float`) or 64 (`double`, the default).
public struct ValueSpec: Sendable, Equatable {
  public enum Format: UInt8, Sendable {
    case signed = 0x64  // d
    case unsigned = 0x75  // u
    case hex = 0x78  // x
    case string = 0x73  // s
    case character = 0x63  // c
    case float = 0x66  // f
  }

  /// One value to record: `source` 1-6 is integer argument N, 101-108 floating-point argument
  /// N - 100, 0 the return value (rax, or xmm0 with the float format).
  public struct Item: Sendable, Equatable {
    public let source: Int
    public let format: Format
    /// Bits of the register shown: 8, 16, 32 or 64.
    public let bits: Int

    public init(source: Int, format: Format, bits: Int = 64) {
      self.source = source
      self.format = format
      self.bits = bits
    }

    /// The first floating-point argument's source.
    public static let firstFloatArgument = 101

    public var isFloatArgument: Bool { source >= Self.firstFloatArgument }

    /// Where its value is in a `tracery_call` (tracery.h): arguments at 32, rax's result at 88,
    /// xmm0-7 at 112 (16 bytes each), xmm0's result at 240.
    public var callOffset: Int {
      if isFloatArgument { return 112 + 16 * (source - Self.firstFloatArgument) }
      if source == 0 { return format == .float ? 240 : 88 }
      return 32 + 8 * (source - 1)
    }

    /// Its name in `-A`/`-R` and in Chrome JSON: argN, fpargN, retval.
    public var name: String {
      source == 0 ? "retval" : isFloatArgument ? "fparg\(source - Self.firstFloatArgument + 1)" : "arg\(source)"
    }
  }

  public let pattern: String
  public let items: [Item]

  /// Parses `-A` (`returnValue` false) or `-R` text.
  public init(parsing text: String, returnValue: Bool) throws(PatternError) {
    let option = returnValue ? "-R" : "-A"
    guard let at = text.lastIndex(of: "@"), at != text.startIndex else {
      throw PatternError("\(option) '\(text)': expected PATTERN@\(returnValue ? "retval" : "arg1,arg2,...")")
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
      } else if name.hasPrefix("fparg"), let number = Int(name.dropFirst(5)), (1...8).contains(number) {
        source = Item.firstFloatArgument + number - 1
      } else {
        source = nil
      }
      guard let source else {
        throw PatternError(
          "\(option) '\(text)': '\(name)' is not "
            + (returnValue ? "retval" : "arg1 ... arg6 (integer arguments) or fparg1 ... fparg8 (floating point)"))
      }
      let float = source >= Item.firstFloatArgument
      var format = float ? Format.float : Format.signed
      var bits = 64
      if parts.count == 2 {
        let spec = parts[1]
        let letter = spec.first.map { $0 == "i" ? "d" : $0 }
        let size = spec.dropFirst()
        guard let letter, let parsed = letter.asciiValue.flatMap(Format.init(rawValue:)),
          size.isEmpty || ([.signed, .unsigned, .hex].contains(parsed) && ["8", "16", "32", "64"].contains(size))
            || (parsed == .float && ["32", "64"].contains(size))
        else {
          throw PatternError(
            "\(option) '\(text)': format '\(spec)' is not d, i, u, x (with an optional size 8, 16, 32, 64), c, s "
              + "or f (32, 64)")
        }
        guard !float || parsed == .float else {
          throw PatternError("\(option) '\(text)': '\(name)' is a floating-point register: its format is f")
        }
        format = parsed
        bits = size.isEmpty ? (parsed == .character ? 8 : 64) : Int(size)!
      }
      items.append(Item(source: source, format: format, bits: bits))
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
  /// Bits of `integer` shown.
  public let bits: Int

  public init(
    source: Int, format: ValueSpec.Format, integer: UInt64, string: [UInt8]?, truncated: Bool, bits: Int = 64
  ) {
    self.source = source
    self.format = format
    self.integer = integer
    self.string = string
    self.truncated = truncated
    self.bits = bits
  }

  /// The low `bits` of the register, zero- and sign-extended.
  var unsignedValue: UInt64 { bits >= 64 ? integer : integer & ((1 << UInt64(bits)) - 1) }
  var signedValue: Int64 {
    bits >= 64 ? Int64(bitPattern: integer) : Int64(bitPattern: integer << UInt64(64 - bits)) >> Int64(64 - bits)
  }

  /// As uftrace shows it: `-3`, `42`, `0x2a`, `"text"`, `"tex"...`.
  public var text: String {
    switch format {
    case .signed: return String(signedValue)
    case .unsigned: return String(unsignedValue)
    case .hex: return "0x" + String(unsignedValue, radix: 16)
    case .float:
      return bits == 32 ? "\(Float(bitPattern: UInt32(truncatingIfNeeded: integer)))" : "\(Double(bitPattern: integer))"
    case .character:
      let byte = UInt8(truncatingIfNeeded: integer)
      return (0x20..<0x7f).contains(byte) && byte != 0x27 && byte != 0x5c
        ? "'\(Character(Unicode.Scalar(byte)))'" : "'\\x" + String(byte, radix: 16).leftPadded(to: 2) + "'"
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
///                1 string truncated, 2 string unreadable) | bits shown (40-47; 0 means 64),
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
    let head =
      UInt64(item.format.rawValue) | UInt64(item.source) << 8 | UInt64(length) << 16 | flags << 32
      | UInt64(item.bits & 0xff) << 40
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
  public static func header(payload bytes: Int) -> UInt64 { EventWord.dataKind << EventWord.kindShift | UInt64(bytes) }

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
      let flags = (head >> 32) & 0xff
      let bits = Int((head >> 40) & 0xff)
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
          source: source, format: format, integer: integer, string: string, truncated: flags & truncatedFlag != 0,
          bits: bits == 0 ? 64 : bits))
      offset += 16 + (length + 7) / 8 * 8
    }
    return values
  }
}
