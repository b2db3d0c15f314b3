/// Every function of a set of loaded objects, with its patch site: the kernel's kallsyms.
///
/// Functions are kept sorted by runtime address (address → function by binary search) and
/// indexed by name in one hash table with a chain for repeated names (`static` functions of the
/// same name in several files or objects). Built once per set of objects; read-only afterwards,
/// so any thread may query it.
public struct SymbolTable: Sendable {
  /// One object that contributed functions.
  public struct Object: Sendable, Equatable {
    public let path: String
    /// Runtime address = link-time address + bias.
    public let bias: UInt64
    public let buildID: [UInt8]?
  }

  /// What `init` needs of one object.
  public struct Input: Sendable {
    public let path: String
    public let bias: UInt64
    public let file: ELFFile
    /// Functions no symbol names (a stripped object's, found from its call frames: link-time
    /// address and size); named `FILE+0xADDRESS`, as readers name sites in no named function.
    public let unnamed: [(address: UInt64, size: UInt64)]

    public init(path: String, bias: UInt64, file: ELFFile, unnamed: [(address: UInt64, size: UInt64)] = []) {
      self.path = path
      self.bias = bias
      self.file = file
      self.unnamed = unnamed
    }
  }

  /// The name of a function no symbol names: `FILE+0xADDRESS` (link-time address).
  public static func unnamedName(path: String, address: UInt64) -> String {
    unnamedName(prefix: unnamedPrefix(path), address: address)
  }

  /// `FILE+` of `unnamedName` (made once per object: a stripped program names tens of thousands).
  static func unnamedPrefix(_ path: String) -> String {
    "\(path.split(separator: "/").last.map(String.init) ?? "?")+"
  }

  static func unnamedName(prefix: String, address: UInt64) -> String {
    prefix + "0x" + String(address, radix: 16)
  }

  /// One function.
  public struct Function: Sendable, Equatable {
    public let name: String
    /// Runtime address of the symbol.
    public let address: UInt64
    public let size: UInt64
    /// Index into `objects`.
    public let object: Int
    /// Runtime address of its patch site, if the compiler recorded one for it.
    public fileprivate(set) var site: UInt64?
    public fileprivate(set) var siteSource: PatchSiteSource?

    /// The address after its last byte (at least one byte; saturating: a symbol's size is
    /// whatever the file says).
    public var end: UInt64 {
      let (end, overflow) = address.addingReportingOverflow(max(size, 1))
      return overflow ? .max : end
    }
  }

  public let objects: [Object]
  /// Sorted by `address`.
  public let functions: [Function]
  /// Recorded sites that lie in no known function (runtime addresses), per object.
  public let orphanSites: [(object: Int, address: UInt64)]
  private let firstByName: [String: Int32]
  private let nextWithSameName: [Int32]
  /// `Glob.head(of:)` of each function's name: a glob's literal start is compared here, in one
  /// contiguous array, before any name is read (names lie all over the heap: reading each one's
  /// first byte was most of matching `tr_p*` over a process's functions).
  private let nameHeads: [UInt64]

  public init(_ inputs: [Input]) throws(ELFError) {
    var objects: [Object] = []
    var functions: [Function] = []
    var orphans: [(object: Int, address: UInt64)] = []
    for (objectIndex, input) in inputs.enumerated() {
      objects.append(Object(path: input.path, bias: input.bias, buildID: input.file.buildID()))
      let symbols = try input.file.functionSymbols()
      let sites = try input.file.patchSiteRecords()
      var own = symbols.map {
        Function(
          name: $0.name, address: $0.value &+ input.bias, size: $0.size, object: objectIndex, site: nil,
          siteSource: nil)
      }
      if !input.unnamed.isEmpty {
        let prefix = Self.unnamedPrefix(input.path)
        own += input.unnamed.map {
          Function(
            name: Self.unnamedName(prefix: prefix, address: $0.address), address: $0.address &+ input.bias,
            size: $0.size, object: objectIndex, site: nil, siteSource: nil)
        }
        own.sort { $0.address < $1.address }
      }
      Self.attach(sites: sites, bias: input.bias, to: &own) { orphans.append((objectIndex, $0)) }
      // (The first object's array is taken as it is: appending copies, a retain per name.)
      if functions.isEmpty { functions = own } else { functions.append(contentsOf: own) }
    }
    functions.sort { $0.address < $1.address }
    var firstByName: [String: Int32] = [:]
    firstByName.reserveCapacity(functions.count)
    var next = [Int32](repeating: -1, count: functions.count)
    var heads = [UInt64](repeating: 0, count: functions.count)
    // Walk backwards so each chain lists its functions in address order.
    for index in functions.indices.reversed() {
      let name = functions[index].name
      let previous = firstByName.updateValue(Int32(index), forKey: name)
      next[index] = previous ?? -1
      heads[index] =
        name.utf8.withContiguousStorageIfAvailable(Glob.head(of:))
        ?? Array(name.utf8.prefix(8)).withUnsafeBufferPointer(Glob.head(of:))
    }
    self.nameHeads = heads
    self.objects = objects
    self.functions = functions
    self.orphanSites = orphans
    self.firstByName = firstByName
    self.nextWithSameName = next
  }

  /// Maps each recorded site to its function: the function whose bytes contain it, or, for
  /// `-fpatchable-function-entry=N,M` with M > 0 (NOPs before the entry label), the function that
  /// starts at most 64 bytes after it, whose site is then its entry. `functions` is sorted by
  /// address and belongs to one object.
  private static func attach(
    sites: [ELFFile.PatchSiteRecord], bias: UInt64, to functions: inout [Function], orphan: (UInt64) -> Void
  ) {
    var cursor = 0
    for record in sites {
      let site = record.address &+ bias
      while cursor + 1 < functions.count && functions[cursor + 1].address <= site { cursor += 1 }
      var target: Int?
      if cursor < functions.count {
        let function = functions[cursor]
        if function.address <= site && site < function.end {
          target = cursor
        } else {
          let following = function.address > site ? cursor : cursor + 1
          if following < functions.count, functions[following].address > site,
            functions[following].address - site <= 64
          {
            target = following
          }
        }
      }
      guard let index = target, functions[index].site == nil else {
        if target == nil { orphan(site) }
        continue
      }
      functions[index].site = max(site, functions[index].address)
      functions[index].siteSource = record.source
    }
  }

  /// Where the next function after `functions[index]` starts (aliases at the same address
  /// skipped), or nil for the last.
  public func nextStart(after index: Int) -> UInt64? {
    functions[(index + 1)...].first { $0.address > functions[index].address }?.address
  }

  /// The function whose bytes contain `address`, or the one starting there.
  public func function(containing address: UInt64) -> Int? {
    var low = 0
    var high = functions.count
    while low < high {
      let mid = (low + high) / 2
      if functions[mid].address <= address { low = mid + 1 } else { high = mid }
    }
    guard low > 0 else { return nil }
    let candidate = functions[low - 1]
    return address < candidate.end ? low - 1 : nil
  }

  /// `function(containing:)` for addresses visited in ascending order: tries the function after
  /// `previous` (the last answer) before searching.
  public func function(containing address: UInt64, after previous: Int?) -> Int? {
    if let previous, previous + 1 < functions.count {
      let next = previous + 1
      if functions[next].address <= address && (next + 1 == functions.count || functions[next + 1].address > address) {
        return address < functions[next].end ? next : nil
      }
    }
    return function(containing: address)
  }

  /// Every function called exactly `name`, in address order.
  public func functions(named name: String) -> [Int] {
    var result: [Int] = []
    var at = firstByName[name] ?? -1
    while at >= 0 {
      result.append(Int(at))
      at = nextWithSameName[Int(at)]
    }
    return result
  }

  /// Every function whose name matches `glob`, in address order.
  public func functions(matching glob: Glob) -> [Int] {
    if let literal = glob.literal { return functions(named: literal) }
    var result: [Int] = []
    let head = glob.head
    for index in functions.indices where nameHeads[index] & head.mask == head.value {
      if head.decides {
        result.append(index)
        continue
      }
      // In place, without a copy of the name (a retain and release each: most of the scan).
      let matched =
        functions[index].name.utf8.withContiguousStorageIfAvailable { glob.matches(utf8: $0) }
        ?? glob.matches(functions[index].name)
      if matched { result.append(index) }
    }
    return result
  }

  /// The functions that have a patch site, in address order.
  public var patchableFunctions: [Int] { functions.indices.filter { functions[$0].site != nil } }
}
