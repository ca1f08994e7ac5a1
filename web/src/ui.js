// What every view of the page shares: element lookup, the status line's parts and
// the banner (role="alert": screen readers announce it).

export const $ = (id) => document.getElementById(id);

export function setStatus(id, text, className = '') {
  const el = $(id);
  el.textContent = text;
  el.className = className;
}

// Where focus goes when the banner that held it hides (the console sets the terminal).
let focusHome = () => $('main');

export function setFocusHome(find) {
  focusHome = find;
}

/** Show the banner: kind 'error' or 'warning', actions as [label, handler] buttons. */
export function showBanner(kind, text, actions = []) {
  const banner = $('banner');
  banner.className = `banner ${kind}`;
  $('banner-text').textContent = text;
  const holder = $('banner-actions');
  holder.replaceChildren(
    ...actions.map(([label, handler]) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.textContent = label;
      button.addEventListener('click', () => {
        hideBanner();
        handler();
      });
      return button;
    }),
  );
  banner.hidden = false;
}

export function hideBanner() {
  const banner = $('banner');
  const hadFocus = banner.contains(document.activeElement);
  banner.hidden = true;
  if (hadFocus) focusHome().focus();
}
