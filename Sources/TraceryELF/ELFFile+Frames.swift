/// The call frame information in `.eh_frame` (the unwinder's tables, present in stripped objects
/// too) and the exception tables it points to (`.gcc_except_table`): where functions begin and
/// end when no symbol says so, and where their exception landing pads are (code that the
/// unwinder jumps to, which no branch in the code shows).
///
/// Formats: the LSB's `.eh_frame` (CIEs and FDEs, DWARF pointer encodings) and the Itanium C++
/// ABI's LSDA (the call-site table). Every read is bounds-checked: a malformed entry ends the
/// walk (`FrameTable.complete` false), never the program.
extension ELFFile {
  /// One FDE: a function (or a part of one: a `.cold` split is its own FDE) and its LSDA.
  public struct FrameDescription: Sendable, Equatable {
    /// Link-time address of the code it describes, and its size.
    public let start: UInt64
    public let size: UInt64
    /// Link-time address of its language-specific data (C++: the call-site table), if any.
    public let lsda: UInt64?
  }

  public struct FrameTable: Sendable, Equatable {
    public let descriptions: [FrameDescription]
    /// Whether every entry of `.eh_frame` was read (false: the walk stopped at a malformed one).
    public let complete: Bool
  }

  /// The FDEs of `.eh_frame`, in file order (an object without one: empty and complete).
  public func frameDescriptions() -> FrameTable {
    guard let section = section(named: ".eh_frame"), section.hasFileBytes,
      bytes.contains(offset: section.offset, size: section.size)
    else { return FrameTable(descriptions: [], complete: true) }
    var reader = FrameReader(
      bytes: bytes.storage, start: Int(section.offset), end: Int(section.offset + section.size),
      address: section.address)
    var cies: [Int: CommonInformation] = [:]
    var result: [FrameDescription] = []
    while reader.offset < reader.end {
      let entryStart = reader.offset
      guard let length32 = reader.u32() else { break }
      if length32 == 0 { return FrameTable(descriptions: result, complete: true) }  // terminator
      var length = UInt64(length32)
      if length32 == 0xffff_ffff {
        guard let length64 = reader.u64() else { break }
        length = length64
      }
      let bodyStart = reader.offset
      guard length <= UInt64(reader.end - bodyStart) else { break }
      let entryEnd = bodyStart + Int(length)
      guard let id = reader.u32() else { break }
      if id == 0 {
        guard let cie = CommonInformation(reading: &reader, end: entryEnd) else { break }
        cies[entryStart] = cie
      } else {
        // The CIE pointer counts back from this field.
        let cieOffset = bodyStart - Int(id)
        guard let cie = cies[cieOffset],
          let start = reader.pointer(cie.pointerEncoding, end: entryEnd),
          let size = reader.pointer(cie.pointerEncoding & 0x0f, end: entryEnd)
        else { break }
        var lsda: UInt64?
        if cie.hasAugmentationData {
          guard let dataLength = reader.uleb(end: entryEnd), dataLength <= UInt64(entryEnd - reader.offset) else {
            break
          }
          let dataEnd = reader.offset + Int(dataLength)
          if let encoding = cie.lsdaEncoding, encoding != 0xff {
            guard let value = reader.pointer(encoding, end: dataEnd) else { break }
            lsda = value == 0 ? nil : value
          }
        }
        result.append(FrameDescription(start: start, size: size, lsda: lsda))
      }
      reader.offset = entryEnd
    }
    return FrameTable(descriptions: result, complete: reader.offset >= reader.end)
  }

  /// The landing pads (link-time addresses) in the LSDA at `lsda` of the function that starts at
  /// `functionStart`; nil when the LSDA cannot be read (the caller then knows nothing).
  public func landingPads(lsda: UInt64, functionStart: UInt64) -> [UInt64]? {
    guard let offset = fileOffset(ofAddress: lsda), let segmentEnd = segmentFileEnd(containing: lsda) else {
      return nil
    }
    var reader = FrameReader(
      bytes: bytes.storage, start: offset, end: segmentEnd, address: lsda)
    guard let startEncoding = reader.u8() else { return nil }
    var landingPadBase = functionStart
    if startEncoding != 0xff {
      guard let base = reader.pointer(startEncoding, end: reader.end) else { return nil }
      landingPadBase = base
    }
    guard let typeEncoding = reader.u8() else { return nil }
    if typeEncoding != 0xff {
      guard reader.uleb(end: reader.end) != nil else { return nil }
    }
    guard let callSiteEncoding = reader.u8(), let tableLength = reader.uleb(end: reader.end),
      tableLength <= UInt64(reader.end - reader.offset)
    else { return nil }
    let tableEnd = reader.offset + Int(tableLength)
    var pads: [UInt64] = []
    while reader.offset < tableEnd {
      // Start, length and landing pad are offsets (the encoding's format, without pcrel).
      let format = callSiteEncoding & 0x0f
      guard reader.pointer(format, end: tableEnd) != nil, reader.pointer(format, end: tableEnd) != nil,
        let pad = reader.pointer(format, end: tableEnd), reader.uleb(end: tableEnd) != nil
      else { return nil }
      if pad != 0 { pads.append(landingPadBase &+ pad) }
    }
    return pads
  }

  /// The end (file offset) of the loaded segment's file bytes that hold `address`.
  private func segmentFileEnd(containing address: UInt64) -> Int? {
    for segment in segments where segment.type == ELFConstants.PT_LOAD {
      guard address >= segment.virtualAddress, address - segment.virtualAddress < segment.fileSize else { continue }
      let (end, overflow) = segment.offset.addingReportingOverflow(segment.fileSize)
      guard !overflow, end <= UInt64(bytes.count) else { return nil }
      return Int(end)
    }
    return nil
  }
}

/// A CIE's fields that FDEs need.
private struct CommonInformation {
  var pointerEncoding: UInt8 = 0  // DW_EH_PE_absptr unless 'R' says otherwise
  var lsdaEncoding: UInt8?
  var hasAugmentationData = false

  init?(reading reader: inout FrameReader, end: Int) {
    guard let version = reader.u8(), version == 1 || version == 3 || version == 4 else { return nil }
    var augmentation: [UInt8] = []
    while true {
      guard reader.offset < end, let byte = reader.u8() else { return nil }
      if byte == 0 { break }
      augmentation.append(byte)
    }
    if version == 4 {
      guard reader.u8() != nil, reader.u8() != nil else { return nil }  // address and segment size
    }
    guard reader.uleb(end: end) != nil, reader.sleb(end: end) != nil else { return nil }
    if version == 1 {
      guard reader.u8() != nil else { return nil }
    } else {
      guard reader.uleb(end: end) != nil else { return nil }
    }
    guard augmentation.first == UInt8(ascii: "z") else {
      // No augmentation data: pointers are absolute, no LSDA ("eh" and others: not for x86-64).
      guard augmentation.isEmpty else { return nil }
      return
    }
    hasAugmentationData = true
    guard let length = reader.uleb(end: end), length <= UInt64(end - reader.offset) else { return nil }
    let dataEnd = reader.offset + Int(length)
    for character in augmentation.dropFirst() {
      switch character {
      case UInt8(ascii: "R"):
        guard let encoding = reader.u8() else { return nil }
        pointerEncoding = encoding
      case UInt8(ascii: "L"):
        guard let encoding = reader.u8() else { return nil }
        lsdaEncoding = encoding
      case UInt8(ascii: "P"):
        guard let encoding = reader.u8(), reader.pointer(encoding, end: dataEnd) != nil else { return nil }
      case UInt8(ascii: "S"), UInt8(ascii: "B"), UInt8(ascii: "G"):
        break
      default:
        return nil
      }
    }
    reader.offset = dataEnd
  }
}

/// Reads `.eh_frame`-style data from `bytes[start..<end]`, which is mapped at `address` (for
/// pc-relative pointers). Every read returns nil rather than pass `end`.
private struct FrameReader {
  let bytes: [UInt8]
  let start: Int
  let end: Int
  let address: UInt64
  var offset: Int

  init(bytes: [UInt8], start: Int, end: Int, address: UInt64) {
    self.bytes = bytes
    self.start = start
    self.end = min(end, bytes.count)
    self.address = address
    offset = start
  }

  /// The link-time address of the byte at `offset`.
  var here: UInt64 { address &+ UInt64(offset - start) }

  mutating func fixed<T: FixedWidthInteger>(_ type: T.Type, end limit: Int? = nil) -> T? {
    let size = MemoryLayout<T>.size
    guard offset >= 0, offset + size <= min(limit ?? end, end) else { return nil }
    let value = bytes.withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: offset, as: T.self)) }
    offset += size
    return value
  }

  mutating func u8() -> UInt8? { fixed(UInt8.self) }
  mutating func u32() -> UInt32? { fixed(UInt32.self) }
  mutating func u64() -> UInt64? { fixed(UInt64.self) }

  mutating func uleb(end limit: Int) -> UInt64? { leb(end: limit)?.value }

  mutating func sleb(end limit: Int) -> Int64? {
    guard let (value, bits, last) = leb(end: limit) else { return nil }
    // Negative when the last byte's sign bit is set: extend it above the bits read.
    let extended = bits < 64 && last & 0x40 != 0 ? value | ~((UInt64(1) << bits) - 1) : value
    return Int64(bitPattern: extended)
  }

  /// A LEB128 number: its low 64 bits, how many bits it had (7 a byte), and its last byte.
  private mutating func leb(end limit: Int) -> (value: UInt64, bits: UInt64, last: UInt8)? {
    var result: UInt64 = 0
    var shift: UInt64 = 0
    while offset < min(limit, end) {
      let byte = bytes[offset]
      offset += 1
      if shift < 64 { result |= UInt64(byte & 0x7f) << shift }
      shift += 7
      if byte & 0x80 == 0 { return (result, shift, byte) }
    }
    return nil
  }

  /// A pointer in DWARF exception-header encoding `encoding` (low nibble: format; 0x10:
  /// pc-relative; others are taken as absolute, which is what x86-64 objects use besides pcrel).
  mutating func pointer(_ encoding: UInt8, end limit: Int) -> UInt64? {
    guard encoding != 0xff else { return 0 }
    let field = here
    let value: UInt64?
    switch encoding & 0x0f {
    case 0x00, 0x04: value = fixed(UInt64.self, end: limit)
    case 0x01: value = uleb(end: limit)
    case 0x02: value = fixed(UInt16.self, end: limit).map(UInt64.init)
    case 0x03: value = fixed(UInt32.self, end: limit).map(UInt64.init)
    case 0x09: value = sleb(end: limit).map { UInt64(bitPattern: $0) }
    case 0x0a: value = fixed(Int16.self, end: limit).map { UInt64(bitPattern: Int64($0)) }
    case 0x0b: value = fixed(Int32.self, end: limit).map { UInt64(bitPattern: Int64($0)) }
    case 0x0c: value = fixed(Int64.self, end: limit).map { UInt64(bitPattern: $0) }
    default: return nil
    }
    guard let value else { return nil }
    return encoding & 0x70 == 0x10 ? field &+ value : value
  }
}
