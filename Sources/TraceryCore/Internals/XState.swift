import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// The processor state `xsave` saves in this process (x87, SSE, and where enabled AVX's upper
/// halves, AVX-512's opmasks and registers): the components the kernel enabled and their save
/// area's size. Generated code that calls Swift or C code between a traced function's caller and
/// its body (the recorder's refill) keeps all of it; `size` 0: no `xsave` here.
public struct XState: Sendable {
  let components: UInt64
  let size: Int

  /// The environment variable that carries the layout to the processes a tool starts
  /// (`tracery record`), as `COMPONENTS SIZE`: asking the processor takes two `cpuid`s, each a
  /// VM exit (~5.6 µs here) in every traced process. Taken only when its components are this
  /// process's (`xgetbv`, 15 ns) and its size one `xsave` could have.
  public static let environmentKey = "TRACERY_XSAVE"

  /// This process's layout, as `environmentKey` carries it.
  public static var environmentValue: String { "\(current.components) \(current.size)" }

  static let current: XState = {
    if let text = getenv(environmentKey), let given = XState(environment: String(cString: text)) { return given }
    var components: UInt64 = 0
    var size: UInt32 = 0
    ctracery_xsave_layout(&components, &size)
    return XState(components: components, size: Int(size))
  }()

  init(components: UInt64, size: Int) {
    self.components = components
    self.size = size
  }

  /// `environmentValue`'s layout, if it is this process's. (`xgetbv` runs only for a size above
  /// 0, which `tracery record` passes only where the processor has `xsave`; set by hand on one
  /// without it, it would fault.)
  init?(environment text: String) {
    let fields = text.split(separator: " ")
    guard fields.count == 2, let components = UInt64(fields[0]), let size = Int(fields[1]) else { return nil }
    // Without xsave: nothing to check, and xgetbv may not run; asked anew.
    guard size > 0 else { return nil }
    // The legacy area and the header at least, a few pages at most.
    guard (576...(1 << 16)).contains(size), components & 3 == 3, components == ctracery_xcr0() else { return nil }
    self.init(components: components, size: size)
  }
}
