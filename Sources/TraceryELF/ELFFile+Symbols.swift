extension ELFFile {
  /// One symbol (`Elf64_Sym`).
  public struct Symbol: Sendable, Equatable {
    public let name: String
    /// Link-time address (`st_value`).
    public let value: UInt64
    public let size: UInt64
    /// `ELF64_ST_TYPE(st_info)`.
    public let type: UInt8
    /// `ELF64_ST_BIND(st_info)`.
    public let binding: UInt8
    public let sectionIndex: UInt16

    /// A function defined in this object (not an import).
    public var isDefinedFunction: Bool { Self.isDefinedFunction(type: type, sectionIndex: sectionIndex, value: value) }

    static func isDefinedFunction(type: UInt8, sectionIndex: UInt16, value: UInt64) -> Bool {
      (type == ELFConstants.STT_FUNC || type == ELFConstants.STT_GNU_IFUNC) && sectionIndex != ELFConstants.SHN_UNDEF
        && value != 0
    }
  }

  /// The symbols of the symbol table section `section` (`SHT_SYMTAB` or `SHT_DYNSYM`).
  public func symbols(in section: Section) throws(ELFError) -> [Symbol] {
    try symbols(in: section) { _, _, _ in true }
  }

  /// The symbols of `section` whose type, section index and value `wanted` accepts (decided
  /// before their names are read: a program's symbol table is mostly other symbols).
  func symbols(
    in section: Section, where wanted: (_ type: UInt8, _ sectionIndex: UInt16, _ value: UInt64) -> Bool
  ) throws(ELFError) -> [Symbol] {
    guard section.size > 0 else { return [] }
    guard section.entrySize == 24 else {
      throw .badEntrySize(table: section.name, size: Int(clamping: section.entrySize), expected: 24)
    }
    // A section without file bytes (SHT_NOBITS) has none to read, whatever its size says.
    guard section.hasFileBytes, bytes.contains(offset: section.offset, size: section.size) else {
      throw .outOfBounds(
        what: "symbols of \(section.name)", offset: section.offset, size: section.size, fileSize: bytes.count)
    }
    let strings = try linkedStringTable(of: section)
    let count = Int(section.size / 24)
    var result: [Symbol] = []
    result.reserveCapacity(count)
    for index in 0..<count {
      let base = Int(section.offset) + index * 24
      let info = bytes.u8(base + 4)
      let value = bytes.u64(base + 8)
      let sectionIndex = bytes.u16(base + 6)
      let nameOffset = Int(bytes.u32(base))
      guard wanted(info & 0xf, sectionIndex, value) else {
        // Not read, but a name outside its table is still the corruption it is.
        guard strings.start + nameOffset < strings.end else {
          throw .badStringOffset(table: "string table of \(section.name)", offset: UInt64(nameOffset))
        }
        continue
      }
      var name = ""
      if nameOffset != 0 {
        guard
          let found = bytes.cString(at: strings.start + nameOffset, tableStart: strings.start, tableEnd: strings.end)
        else { throw .badStringOffset(table: "string table of \(section.name)", offset: UInt64(nameOffset)) }
        name = found
      }
      result.append(
        Symbol(
          name: name, value: value, size: bytes.u64(base + 16), type: info & 0xf, binding: info >> 4,
          sectionIndex: sectionIndex))
    }
    return result
  }

  /// Defined functions: from `.symtab` when the object has one, else from `.dynsym`; sorted by
  /// address, duplicates (aliases at the same address with the same name) removed.
  public func functionSymbols() throws(ELFError) -> [Symbol] {
    var table = sections.first { $0.type == ELFConstants.SHT_SYMTAB && $0.size > 0 }
    if table == nil { table = sections.first { $0.type == ELFConstants.SHT_DYNSYM } }
    guard let table else { return [] }
    // In place, names compared only between symbols at one address: copies of the symbols (a
    // filtered array, tuples of value and name in the sort's comparisons, the last one kept)
    // retained each name again and again, a sixth of building a large program's symbol table.
    var functions = try symbols(in: table) { type, sectionIndex, value in
      Symbol.isDefinedFunction(type: type, sectionIndex: sectionIndex, value: value)
    }
    functions.removeAll { $0.name.isEmpty }
    functions.sort { $0.value != $1.value ? $0.value < $1.value : $0.name < $1.name }
    // Each (address, name) once.
    var kept = 0
    for index in functions.indices {
      if kept > 0, functions[kept - 1].value == functions[index].value,
        functions[kept - 1].name == functions[index].name
      {
        continue
      }
      if kept != index { functions.swapAt(kept, index) }
      kept += 1
    }
    functions.removeLast(functions.count - kept)
    return functions
  }

  private func linkedStringTable(of section: Section) throws(ELFError) -> (start: Int, end: Int) {
    let link = Int(section.link)
    guard link > 0, link < sections.count else {
      throw .badSectionIndex(what: "sh_link of \(section.name)", index: link, count: sections.count)
    }
    let strings = sections[link]
    guard strings.hasFileBytes else { throw .badStringOffset(table: "string table of \(section.name)", offset: 0) }
    return (Int(strings.offset), Int(strings.offset + strings.size))
  }

  /// A function this object calls in another object through its PLT: the GOT slot the dynamic
  /// linker fills with the function's address (`R_X86_64_JUMP_SLOT`).
  public struct ImportSlot: Sendable, Equatable {
    /// Link-time address of the GOT slot.
    public let slot: UInt64
    public let name: String
  }

  /// The object's PLT imports (`R_X86_64_JUMP_SLOT` relocations of undefined symbols), in order.
  public func importSlots() throws(ELFError) -> [ImportSlot] {
    var result: [ImportSlot] = []
    for section in sections where section.type == ELFConstants.SHT_RELA && section.size > 0 {
      guard section.entrySize == 24 else {
        throw .badEntrySize(table: section.name, size: Int(clamping: section.entrySize), expected: 24)
      }
      guard bytes.contains(offset: section.offset, size: section.size) else {
        throw .outOfBounds(what: section.name, offset: section.offset, size: section.size, fileSize: bytes.count)
      }
      let count = Int(section.size / 24)
      var symbols: [Symbol]?
      for index in 0..<count {
        let base = Int(section.offset) + index * 24
        let info = bytes.u64(base + 8)
        guard UInt32(truncatingIfNeeded: info) == ELFConstants.R_X86_64_JUMP_SLOT else { continue }
        if symbols == nil {
          guard Int(section.link) < sections.count else {
            throw .badSectionIndex(what: "symbols of \(section.name)", index: Int(section.link), count: sections.count)
          }
          symbols = try self.symbols(in: sections[Int(section.link)])
        }
        let symbol = Int(info >> 32)
        guard let symbols, symbol > 0, symbol < symbols.count, symbols[symbol].sectionIndex == 0,
          !symbols[symbol].name.isEmpty
        else { continue }
        result.append(ImportSlot(slot: bytes.u64(base), name: symbols[symbol].name))
      }
    }
    return result
  }

  /// Whether the object keeps its full symbol table (`.symtab`): not stripped.
  public var hasSymbolTable: Bool { sections.contains { $0.type == ELFConstants.SHT_SYMTAB && $0.size > 0 } }

  /// The addends of every `R_X86_64_RELATIVE` relocation: in a position-independent object, the
  /// link-time addresses its data points at (function pointer tables, `.init_array`, vtables).
  public func relativeAddends() -> [UInt64] {
    var result: [UInt64] = []
    for section in sections where section.type == ELFConstants.SHT_RELA && section.entrySize == 24 {
      guard bytes.contains(offset: section.offset, size: section.size) else { continue }
      for index in 0..<Int(section.size / 24) {
        let base = Int(section.offset) + index * 24
        if UInt32(truncatingIfNeeded: bytes.u64(base + 8)) == ELFConstants.R_X86_64_RELATIVE {
          result.append(bytes.u64(base + 16))
        }
      }
    }
    return result
  }

  /// The addends of the `R_X86_64_RELATIVE` relocations of the 8-byte words of `range`, one
  /// element per word (nil where a word has none). lld leaves the words of
  /// `__patchable_function_entries` zero in PIE and shared objects and puts the value here only.
  func relativeAddends(ofWordsIn range: Range<UInt64>) throws(ELFError) -> [UInt64?] {
    var result = [UInt64?](repeating: nil, count: Int((range.upperBound - range.lowerBound) / 8))
    for section in sections where section.type == ELFConstants.SHT_RELA && section.size > 0 {
      guard section.entrySize == 24 else {
        throw .badEntrySize(table: section.name, size: Int(clamping: section.entrySize), expected: 24)
      }
      for index in 0..<Int(section.size / 24) {
        let base = Int(section.offset) + index * 24
        let target = bytes.u64(base)
        guard range.contains(target), (target - range.lowerBound) % 8 == 0,
          UInt32(truncatingIfNeeded: bytes.u64(base + 8)) == ELFConstants.R_X86_64_RELATIVE
        else { continue }
        let slot = Int((target - range.lowerBound) / 8)
        if slot < result.count { result[slot] = bytes.u64(base + 16) }
      }
    }
    return result
  }

  // MARK: - Dynamic section and notes

  /// `DT_NEEDED` names, in order.
  public func neededLibraries() throws(ELFError) -> [String] {
    try dynamicStrings(tag: ELFConstants.DT_NEEDED)
  }

  /// The strings of every dynamic entry with `tag` (a string-valued tag), each split at `:`.
  func dynamicPathList(tag: UInt64) throws(ELFError) -> [String] {
    try dynamicStrings(tag: tag).flatMap { $0.split(separator: ":").map(String.init) }
  }

  private func dynamicStrings(tag: UInt64) throws(ELFError) -> [String] {
    guard let dynamic = sections.first(where: { $0.type == ELFConstants.SHT_DYNAMIC }), dynamic.size >= 16 else {
      return []
    }
    let strings = try linkedStringTable(of: dynamic)
    var result: [String] = []
    for index in 0..<Int(dynamic.size / 16) {
      let base = Int(dynamic.offset) + index * 16
      let entryTag = bytes.u64(base)
      if entryTag == 0 { break }
      guard entryTag == tag else { continue }
      let offset = bytes.u64(base + 8)
      guard offset < UInt64(strings.end - strings.start),
        let value = bytes.cString(at: strings.start + Int(offset), tableStart: strings.start, tableEnd: strings.end)
      else { throw .badStringOffset(table: "dynamic string table", offset: offset) }
      result.append(value)
    }
    return result
  }

  /// The GNU build-id note, if any.
  public func buildID() -> [UInt8]? {
    for section in sections where section.type == ELFConstants.SHT_NOTE && section.size >= 12 {
      var at = Int(section.offset)
      let end = Int(section.offset + section.size)
      while at + 12 <= end {
        let nameSize = Int(bytes.u32(at))
        let descSize = Int(bytes.u32(at + 4))
        let noteType = bytes.u32(at + 8)
        let nameStart = at + 12
        let descStart = nameStart + (nameSize + 3) & ~3
        let next = descStart + (descSize + 3) & ~3
        guard nameSize >= 0, descSize >= 0, descStart + descSize <= end else { break }
        if noteType == ELFConstants.NT_GNU_BUILD_ID && nameSize == 4 && bytes.u32(nameStart) == 0x0055_4e47 {
          return Array(bytes.storage[descStart..<descStart + descSize])
        }
        at = next
      }
    }
    return nil
  }
}
