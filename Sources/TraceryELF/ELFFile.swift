#if canImport(Glibc)
  import Glibc
#endif

/// An ELF64 x86-64 object (executable, shared object or relocatable file), validated once.
///
/// `init(bytes:)` is the only way in: it checks the header, the section and program header
/// tables and every section's file range, so that all later reads stay inside the bytes. Anything
/// malformed is an `ELFError`, never a crash.
public struct ELFFile: Sendable {
  /// `e_type`.
  public enum ObjectType: Sendable, Equatable {
    case relocatable, executable, sharedObject, other(UInt16)
  }

  /// One section header (`Elf64_Shdr`).
  public struct Section: Sendable, Equatable {
    public let index: Int
    public let name: String
    public let type: UInt32
    public let flags: UInt64
    public let address: UInt64
    public let offset: UInt64
    public let size: UInt64
    public let link: UInt32
    public let info: UInt32
    public let entrySize: UInt64

    /// `SHT_NOBITS` (`.bss`): occupies memory, not file bytes.
    /// Whether its offset and size name bytes of the file (validated in `init`): not for
    /// `SHT_NOBITS` and `SHT_NULL`, whose offsets are not checked.
    public var hasFileBytes: Bool { type != ELFConstants.SHT_NOBITS && type != ELFConstants.SHT_NULL }
  }

  /// One program header (`Elf64_Phdr`).
  public struct Segment: Sendable, Equatable {
    public let type: UInt32
    public let flags: UInt32
    public let offset: UInt64
    public let virtualAddress: UInt64
    public let fileSize: UInt64
    public let memorySize: UInt64
  }

  let bytes: ELFBytes
  public let type: ObjectType
  public let entry: UInt64
  public let sections: [Section]
  public let segments: [Segment]

  /// Reads and validates the file at `path`.
  public init(path: String) throws(ELFError) {
    try self.init(bytes: try Self.readFile(path))
  }

  /// The file at `path` without its code and data: sections of executable code and the
  /// program's data (`.rodata*`, `.data*`) read as `SHT_NOBITS` (no file bytes) and segments
  /// without file bytes, everything else as in `init(path:)`. For what a tracer reads of every
  /// loaded object (symbols, patch sites, relocations, notes, call frames), whose code and data
  /// are in memory: a 2,200-function program's file was ~0.3 ms of page faults and copying per
  /// traced process, 60% of it code; gcc's cc1 has 20 MB of code and 7.5 MB of `.rodata`,
  /// read twice a process. Small files are read whole.
  public init(pathWithoutCode path: String) throws(ELFError) {
    // One open either way (a small program's file was opened twice, and the ELF read once more
    // by the library calls: each open here is ~5 µs of every traced process's start).
    let (fd, size) = try Self.openRegular(path)
    defer { close(fd) }
    if let compact = Self.compactImage(of: fd, size: size) {
      try self.init(bytes: compact)
    } else {
      try self.init(bytes: try Self.readWhole(fd, size: size, path: path))
    }
  }

  /// Validates `bytes` as an ELF64 little-endian x86-64 object.
  public init(bytes raw: [UInt8]) throws(ELFError) {
    let bytes = ELFBytes(storage: raw)
    self.bytes = bytes
    guard bytes.count >= 4 else { throw .tooSmall(size: bytes.count) }
    guard raw[0] == 0x7f, raw[1] == 0x45, raw[2] == 0x4c, raw[3] == 0x46 else { throw .notELF }
    guard bytes.count >= 64 else { throw .tooSmall(size: bytes.count) }
    guard raw[4] == 2 else { throw .not64Bit(elfClass: raw[4]) }
    guard raw[5] == 1 else { throw .notLittleEndian }
    guard raw[6] == 1 else { throw .badVersion(UInt32(raw[6])) }
    let machine = bytes.u16(18)
    guard machine == ELFConstants.EM_X86_64 else { throw .notX86_64(machine: machine) }
    let version = bytes.u32(20)
    guard version == 1 else { throw .badVersion(version) }
    switch bytes.u16(16) {
    case 1: type = .relocatable
    case 2: type = .executable
    case 3: type = .sharedObject
    case let other: type = .other(other)
    }
    entry = bytes.u64(24)
    segments = try Self.readSegments(bytes)
    sections = try Self.readSections(bytes)
  }

  /// The first section called `name`.
  public func section(named name: String) -> Section? { sections.first { $0.name == name } }

  /// Every section called `name` (lld may emit several `__patchable_function_entries`).
  public func sections(named name: String) -> [Section] { sections.filter { $0.name == name } }

  /// The file bytes of `section` (empty for `SHT_NOBITS` and `SHT_NULL`). Validated in `init`.
  public func contents(of section: Section) -> ArraySlice<UInt8> {
    guard section.hasFileBytes, section.size > 0, bytes.contains(offset: section.offset, size: section.size) else {
      return []
    }
    return bytes.storage[Int(section.offset)..<Int(section.offset + section.size)]
  }

  /// The file offset that holds link-time address `address`, if a loaded segment has file bytes
  /// for `count` bytes there.
  public func fileOffset(ofAddress address: UInt64, count: UInt64 = 1) -> Int? {
    for segment in segments where segment.type == ELFConstants.PT_LOAD {
      guard address >= segment.virtualAddress, address - segment.virtualAddress + count <= segment.fileSize
      else { continue }
      let offset = segment.offset + (address - segment.virtualAddress)
      return bytes.contains(offset: offset, size: count) ? Int(offset) : nil
    }
    return nil
  }

  /// `count` bytes of the file image at link-time address `address`, or nil if no segment has them.
  public func bytes(atAddress address: UInt64, count: Int) -> [UInt8]? {
    guard count >= 0, let offset = fileOffset(ofAddress: address, count: UInt64(count)) else { return nil }
    return Array(bytes.storage[offset..<offset + count])
  }

  /// A compact image of the file at `path` (see `init(pathWithoutCode:)`): its header, program
  /// headers with no file bytes, the file bytes of every section but code, then the section
  /// headers with their new offsets. nil when the file is small, or unusual enough that the
  /// whole file should be read (and judged) instead.
  static func readFileWithoutCode(_ path: String) -> [UInt8]? {
    guard let (fd, size) = try? openRegular(path) else { return nil }
    defer { close(fd) }
    return compactImage(of: fd, size: size)
  }

  /// `readFileWithoutCode` of the open regular file `fd` of `size` bytes.
  private static func compactImage(of fd: Int32, size fileSize: off_t) -> [UInt8]? {
    guard fileSize >= 1 << 18 else { return nil }
    let size = UInt64(fileSize)
    func read(_ offset: UInt64, _ count: UInt64, into destination: UnsafeMutableRawPointer) -> Bool {
      guard count <= size, offset <= size - count else { return false }
      return pread(fd, destination, Int(count), off_t(offset)) == Int(count)
    }
    // (Extended section numbering, e_shnum 0 or e_shstrndx 0xffff: read whole instead.)
    guard let headers = headers(of: fd), !headers.table.isEmpty else { return nil }
    let header = headers.header
    var table = headers.table
    let bytes = ELFBytes(storage: header)
    let (programOffset, programCount) = (bytes.u64(32), Int(bytes.u16(56)))
    let sectionCount = Int(bytes.u16(60))
    guard bytes.u16(54) == 56, sectionCount > 0, bytes.u16(62) < 0xff00 else { return nil }
    // The section names: data sections are left out by name.
    let names = sectionNames(fd, table: table, namesIndex: headers.namesIndex, limit: 1 << 20) ?? []
    func isData(_ nameOffset: Int) -> Bool {
      guard nameOffset < names.count else { return false }
      let name = names[nameOffset...].prefix { $0 != 0 }
      return name.starts(with: Array(".rodata".utf8)) || name.starts(with: Array(".data".utf8))
    }
    // The layout: header, program headers, each kept section 8-aligned, the section table.
    func aligned(_ position: Int) -> Int { (position + 7) & ~7 }
    let programAt = 64
    var position = programAt + programCount * 56
    var copies: [(from: UInt64, count: UInt64, to: Int)] = []
    var skipped: UInt64 = 0
    let done: Bool = table.withUnsafeMutableBytes { entries in
      for index in 0..<sectionCount {
        let base = index * 64
        let type = entries.load(fromByteOffset: base + 4, as: UInt32.self)
        let flags = entries.loadUnaligned(fromByteOffset: base + 8, as: UInt64.self)
        let (offset, length) = (
          entries.loadUnaligned(fromByteOffset: base + 24, as: UInt64.self),
          entries.loadUnaligned(fromByteOffset: base + 32, as: UInt64.self)
        )
        guard type != ELFConstants.SHT_NOBITS, type != ELFConstants.SHT_NULL else { continue }
        let name = Int(entries.loadUnaligned(fromByteOffset: base, as: UInt32.self))
        if flags & ELFConstants.SHF_EXECINSTR != 0 || (type == ELFConstants.SHT_PROGBITS && isData(name)) {
          // Code and data: no file bytes (SHT_NOBITS, offset 0).
          skipped += length
          entries.storeBytes(of: ELFConstants.SHT_NOBITS, toByteOffset: base + 4, as: UInt32.self)
          entries.storeBytes(of: UInt64(0), toByteOffset: base + 24, as: UInt64.self)
        } else {
          guard length <= size, offset <= size - length else { return false }
          position = aligned(position)
          copies.append((offset, length, position))
          entries.storeBytes(of: UInt64(position), toByteOffset: base + 24, as: UInt64.self)
          position += Int(length)
        }
      }
      return true
    }
    guard done, skipped >= 1 << 16 else { return nil }
    let tableAt = aligned(position)
    var image = [UInt8](repeating: 0, count: tableAt + table.count)
    let filled = image.withUnsafeMutableBytes { image -> Bool in
      let base = image.baseAddress!
      header.withUnsafeBytes { base.copyMemory(from: $0.baseAddress!, byteCount: 64) }
      base.storeBytes(of: UInt64(programAt), toByteOffset: 32, as: UInt64.self)
      base.storeBytes(of: UInt64(tableAt), toByteOffset: 40, as: UInt64.self)
      guard programCount == 0 || read(programOffset, UInt64(programCount * 56), into: base + programAt) else {
        return false
      }
      // Program headers: types and addresses kept, no file bytes (p_offset, p_filesz 0).
      for index in 0..<programCount {
        base.storeBytes(of: UInt64(0), toByteOffset: programAt + index * 56 + 8, as: UInt64.self)
        base.storeBytes(of: UInt64(0), toByteOffset: programAt + index * 56 + 32, as: UInt64.self)
      }
      for copy in copies where !read(copy.from, copy.count, into: base + copy.to) { return false }
      table.withUnsafeBytes { (base + tableAt).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
      return true
    }
    return filled ? image : nil
  }

  static func readFile(_ path: String) throws(ELFError) -> [UInt8] {
    let (fd, size) = try openRegular(path)
    defer { close(fd) }
    return try readWhole(fd, size: size, path: path)
  }

  /// A descriptor of the regular file at `path` (the caller closes it), and its size.
  private static func openRegular(_ path: String) throws(ELFError) -> (fd: Int32, size: off_t) {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw .unreadable(path: path, errno: errno) }
    var status = stat()
    guard fstat(fd, &status) == 0 else {
      let error = errno
      close(fd)
      throw .unreadable(path: path, errno: error)
    }
    guard (status.st_mode & S_IFMT) == S_IFREG else {
      close(fd)
      throw .unreadable(path: path, errno: EISDIR)
    }
    return (fd, status.st_size)
  }

  /// The `size` bytes of the open file `fd` (fewer if it ends sooner), read from its start.
  private static func readWhole(_ fd: Int32, size: off_t, path: String) throws(ELFError) -> [UInt8] {
    var result = [UInt8](repeating: 0, count: Int(size))
    var done = 0
    while done < result.count {
      let got = result.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(done)) }
      if got < 0 {
        if errno == EINTR { continue }
        throw .unreadable(path: path, errno: errno)
      }
      if got == 0 { break }
      done += got
    }
    if done < result.count { result.removeLast(result.count - done) }
    return result
  }

  private static func checkTable(
    _ bytes: ELFBytes, name: String, offset: UInt64, count: Int, entrySize: Int, expected: Int
  ) throws(ELFError) {
    guard count > 0 else { return }
    guard entrySize == expected else { throw .badEntrySize(table: name, size: entrySize, expected: expected) }
    let size = UInt64(count) * UInt64(entrySize)
    guard bytes.contains(offset: offset, size: size) else {
      throw .outOfBounds(what: name, offset: offset, size: size, fileSize: bytes.count)
    }
  }

  private static func readSegments(_ bytes: ELFBytes) throws(ELFError) -> [Segment] {
    let offset = bytes.u64(32)
    let count = Int(bytes.u16(56))
    try checkTable(
      bytes, name: "program header table", offset: offset, count: count, entrySize: Int(bytes.u16(54)),
      expected: 56)
    return (0..<count).map { index in
      let base = Int(offset) + index * 56
      return Segment(
        type: bytes.u32(base), flags: bytes.u32(base + 4), offset: bytes.u64(base + 8),
        virtualAddress: bytes.u64(base + 16), fileSize: bytes.u64(base + 32), memorySize: bytes.u64(base + 40))
    }
  }

  private static func readSections(_ bytes: ELFBytes) throws(ELFError) -> [Section] {
    let offset = bytes.u64(40)
    guard offset != 0 else { return [] }
    let entrySize = Int(bytes.u16(58))
    var count = Int(bytes.u16(60))
    var namesIndex = Int(bytes.u16(62))
    // More than SHN_LORESERVE sections: the real count and name index live in section 0.
    if count == 0 || namesIndex == 0xffff {
      try checkTable(bytes, name: "section header table", offset: offset, count: 1, entrySize: entrySize, expected: 64)
      if count == 0 { count = Int(clamping: bytes.u64(Int(offset) + 32)) }
      if namesIndex == 0xffff { namesIndex = Int(bytes.u32(Int(offset) + 40)) }
    }
    guard count <= bytes.count / 64 else {
      throw .outOfBounds(
        what: "section header table", offset: offset,
        size: UInt64(count).multipliedReportingOverflow(by: 64).partialValue,
        fileSize: bytes.count)
    }
    try checkTable(
      bytes, name: "section header table", offset: offset, count: count, entrySize: entrySize, expected: 64)
    struct Raw {
      var name: UInt32, type: UInt32, flags: UInt64, address: UInt64, offset: UInt64, size: UInt64
      var link: UInt32, info: UInt32, entrySize: UInt64
    }
    var raws: [Raw] = []
    raws.reserveCapacity(count)
    for index in 0..<count {
      let base = Int(offset) + index * 64
      let raw = Raw(
        name: bytes.u32(base), type: bytes.u32(base + 4), flags: bytes.u64(base + 8), address: bytes.u64(base + 16),
        offset: bytes.u64(base + 24), size: bytes.u64(base + 32), link: bytes.u32(base + 40),
        info: bytes.u32(base + 44), entrySize: bytes.u64(base + 56))
      if raw.type != ELFConstants.SHT_NOBITS && raw.type != ELFConstants.SHT_NULL
        && !bytes.contains(offset: raw.offset, size: raw.size)
      {
        throw .outOfBounds(what: "section \(index)", offset: raw.offset, size: raw.size, fileSize: bytes.count)
      }
      raws.append(raw)
    }
    var nameTable: (start: Int, end: Int)?
    if namesIndex != 0 {
      guard namesIndex < count else { throw .badSectionIndex(what: "e_shstrndx", index: namesIndex, count: count) }
      let names = raws[namesIndex]
      guard names.type != ELFConstants.SHT_NOBITS && names.type != ELFConstants.SHT_NULL else {
        throw .badStringOffset(table: "section names (section \(namesIndex) has no file bytes)", offset: 0)
      }
      nameTable = (Int(names.offset), Int(names.offset + names.size))
    }
    var sections: [Section] = []
    sections.reserveCapacity(count)
    for (index, raw) in raws.enumerated() {
      var name = ""
      if let table = nameTable, index != 0 || raw.name != 0 {
        guard let found = bytes.cString(at: table.start + Int(raw.name), tableStart: table.start, tableEnd: table.end)
        else { throw .badStringOffset(table: "section names", offset: UInt64(raw.name)) }
        name = found
      }
      sections.append(
        Section(
          index: index, name: name, type: raw.type, flags: raw.flags, address: raw.address, offset: raw.offset,
          size: raw.type == ELFConstants.SHT_NULL ? 0 : raw.size, link: raw.link, info: raw.info,
          entrySize: raw.entrySize))
    }
    return sections
  }
}

/// The ELF constants Tracery reads, with the specification's names.
public enum ELFConstants {
  public static let EM_X86_64: UInt16 = 62
  public static let SHT_NULL: UInt32 = 0
  public static let SHT_PROGBITS: UInt32 = 1
  public static let SHT_SYMTAB: UInt32 = 2
  public static let SHT_STRTAB: UInt32 = 3
  public static let SHT_RELA: UInt32 = 4
  public static let SHT_DYNAMIC: UInt32 = 6
  public static let SHT_NOTE: UInt32 = 7
  public static let SHT_NOBITS: UInt32 = 8
  public static let SHT_DYNSYM: UInt32 = 11
  public static let SHF_EXECINSTR: UInt64 = 4
  public static let PT_LOAD: UInt32 = 1
  public static let PT_DYNAMIC: UInt32 = 2
  public static let PT_NOTE: UInt32 = 4
  public static let PF_X: UInt32 = 1
  public static let STT_FUNC: UInt8 = 2
  public static let STT_GNU_IFUNC: UInt8 = 10
  public static let SHN_UNDEF: UInt16 = 0
  public static let R_X86_64_64: UInt32 = 1
  public static let R_X86_64_RELATIVE: UInt32 = 8
  public static let R_X86_64_JUMP_SLOT: UInt32 = 7
  public static let DT_NEEDED: UInt64 = 1
  public static let DT_RPATH: UInt64 = 15
  public static let DT_RUNPATH: UInt64 = 29
  public static let NT_GNU_BUILD_ID: UInt32 = 3
}

extension ELFFile {
  /// Whether the file at `path` records patch sites (a `__patchable_function_entries` or
  /// `__mcount_loc` section), read from its section headers alone (three reads, whatever the
  /// file's size): what a tracer asks of every object it loads, most of which have none. nil
  /// when the file cannot be read as ELF64.
  public static func recordsPatchSites(path: String) -> Bool? {
    // Compared as bytes in place: every traced process asks this of every object it loads, and
    // a set of strings per object was ~0.1 ms of a small program's start.
    let wanted: [[UInt8]] = [Array("__patchable_function_entries".utf8), Array("__mcount_loc".utf8)]
    var found = false
    let readable = forEachSectionName(path: path) { name in
      found = wanted.contains { name.elementsEqual($0) }
      return !found
    }
    return readable ? found : nil
  }

  /// The names of the file's sections, from its headers only; nil when they cannot be read.
  public static func sectionNames(path: String) -> Set<String>? {
    var result = Set<String>()
    let readable = forEachSectionName(path: path) { name in
      result.insert(String(decoding: name, as: UTF8.self))
      return true
    }
    return readable ? result : nil
  }

  /// Calls `body` with each section's name (its bytes, without the terminating zero) read from
  /// the file's headers only, until it returns false; false when the headers cannot be read.
  private static func forEachSectionName(path: String, _ body: (UnsafeBufferPointer<UInt8>) -> Bool) -> Bool {
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    guard let (_, table, count, namesIndex) = headers(of: fd) else { return false }
    guard count > 0 else { return true }
    let entries = ELFBytes(storage: table)
    guard let names = sectionNames(fd, table: table, namesIndex: namesIndex, limit: 1 << 24) else { return false }
    return names.withUnsafeBufferPointer { all in
      for index in 0..<count {
        let start = Int(entries.u32(index * 64))
        guard start < all.count else { continue }
        var end = start
        while end < all.count && all[end] != 0 { end += 1 }
        guard body(UnsafeBufferPointer(rebasing: all[start..<end])) else { break }
      }
      return true
    }
  }

  /// The section-name string table (`.shstrtab`) of the file open at `fd`: section `namesIndex`
  /// of the section table `table` (`headers(of:)`); nil when it is larger than `limit` or cannot
  /// be read.
  private static func sectionNames(_ fd: Int32, table: [UInt8], namesIndex: Int, limit: UInt64) -> [UInt8]? {
    let entries = ELFBytes(storage: table)
    guard (namesIndex + 1) * 64 <= table.count else { return nil }
    let size = entries.u64(namesIndex * 64 + 32)
    guard size <= limit else { return nil }
    return readBytes(fd, entries.u64(namesIndex * 64 + 24), Int(size))
  }

  /// `count` bytes at `offset` of `fd` (at most 64 MiB), or nil.
  private static func readBytes(_ fd: Int32, _ offset: UInt64, _ count: Int) -> [UInt8]? {
    guard count >= 0, count <= 1 << 26, offset <= UInt64(Int.max) else { return nil }
    var buffer = [UInt8](repeating: 0, count: count)
    let got = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
    return got == count ? buffer : nil
  }

  /// The ELF64 little-endian header of the file open at `fd` and its section table (extended
  /// section numbering followed: the count and names' index from section 0), from the headers
  /// alone; an empty table when the file has none. nil when they cannot be read.
  static func headers(of fd: Int32) -> (header: [UInt8], table: [UInt8], count: Int, namesIndex: Int)? {
    guard let header = readBytes(fd, 0, 64), header[0..<4] == [0x7f, 0x45, 0x4c, 0x46], header[4] == 2, header[5] == 1
    else { return nil }
    let fields = ELFBytes(storage: header)
    let tableOffset = fields.u64(40)
    var count = Int(fields.u16(60))
    var namesIndex = Int(fields.u16(62))
    guard tableOffset != 0 else { return (header, [], 0, 0) }
    guard fields.u16(58) == 64 else { return nil }
    if count == 0 || namesIndex == 0xffff {
      guard let first = readBytes(fd, tableOffset, 64) else { return nil }
      let section = ELFBytes(storage: first)
      if count == 0 { count = Int(clamping: section.u64(32)) }
      if namesIndex == 0xffff { namesIndex = Int(section.u32(40)) }
    }
    guard count > 0, count <= 1 << 20, namesIndex < count, let table = readBytes(fd, tableOffset, count * 64) else {
      return nil
    }
    return (header, table, count, namesIndex)
  }
}
